"""Developer tools (extra ``tools``): loadgen, sink, demo; the daemon never imports them."""
