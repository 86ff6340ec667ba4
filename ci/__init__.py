"""tinyci: a small self-hosted CI made of an observer, a dispatcher and runners."""
