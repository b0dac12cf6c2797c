"""bsce-serve HTTP server (BentoML): see server/README.md and server/service.py."""
