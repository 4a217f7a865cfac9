"""Shipping the journal to standbys over ZeroMQ; promotion and fencing."""
