"""serveml: the ServeML command-line client."""
