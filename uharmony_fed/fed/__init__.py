"""Flower glue: the ServerApp, the ClientApp, and the processes that run them."""
