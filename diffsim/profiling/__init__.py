"""Where the numbers the allocator plans with come from: batch latency measured on this machine
(:mod:`.profiler`, ``diffsim profile``), H100 profiles composed from component measurements
(:mod:`.compose`), and a cascade's deferral curve and FID table measured from generated images
(:mod:`.calibration`, ``diffsim calibrate``)."""
