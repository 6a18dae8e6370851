"""Serving: resident base engine, delta cache, scheduler, HTTP API and CLI."""
