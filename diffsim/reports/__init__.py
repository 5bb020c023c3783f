"""What a run produced, from per-query records: summary figures and per-window time series
(:mod:`.metrics`, the same for simulated and served runs), plots (:mod:`.plot`) and multi-policy
comparisons and sweeps (:mod:`.comparison`)."""
