"""A Django project using stscreds under ASGI (asgi.py) and WSGI (wsgi.py); see settings.py."""
