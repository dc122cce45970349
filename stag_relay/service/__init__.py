"""The running daemon: configuration, wiring, processes, metrics and logs around the pipeline."""
