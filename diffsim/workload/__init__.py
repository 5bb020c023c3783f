"""What is offered to a cascade: traces (:mod:`.traces`, read and written; :mod:`.trace_generators`,
seeded Poisson / Gamma / rate-curve traces), the sample captions (:mod:`.prompts`) and the open-loop load
generator that replays a trace against a running server (:mod:`.loadgen`)."""
