"""The serving layer, as its two processes: `service.core` owns the device (scheduler, runner, admission, auto-K,
stats; in its own `engine-core` process on CUDA), and the rest of this package is the HTTP front end (`app`, the
routes in `api`, `schemas`, `settings`, `png`, `metrics`, `http_limits`, `supervisor` for several front-end workers).
`errors` is shared by both sides. `python -m service` starts the front end, which starts or builds the core."""
