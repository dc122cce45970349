"""Sans-I/O protocol: values in, values out; pure: no trio, no sockets, no files, no processes."""
