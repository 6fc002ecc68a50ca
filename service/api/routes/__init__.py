"""Routes per resource: health and metrics, the model, generation (plain and streamed), the demo page."""
