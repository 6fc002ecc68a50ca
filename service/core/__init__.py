"""The engine core: everything of the service that owns the device. One process runs it (in the HTTP process where
`DUALRATE_ENGINE_PROCESS` is off, in its own `engine-core` process where it is on).

- `scheduler` decides each tick (reaping, admission by `admission`'s policies and priorities, preemption at the
  encoder boundary, auto-K by `autok`) and emits a `TickPlan`; `runner` executes it on the device-resident state
  (`fused`: a whole tick as one captured program); `progress` hands streamed events over; `stats` are the plain
  figures `service.metrics` turns into Prometheus series.
- `handle` is the one interface the HTTP front end sees (`CoreHandle`: `LocalCore` in-process), and builds the core;
  `engine_core` is the core's own process (ZeroMQ ROUTER + msgpack) and `client` its front-end side (`RemoteCore`).
"""
