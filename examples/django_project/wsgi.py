"""WSGI entry point: ``gunicorn --threads 8 examples.django_project.wsgi:application``.

``manage.py runserver`` serves it too (settings.WSGI_APPLICATION). STSCREDS["WARM_UP"] starts
as this module is imported, before runserver listens: with an STS that fetches the JWKS from
this very app, that first try fails, is logged, and requests try again.
"""

import contextlib
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")
django_application = get_wsgi_application()  # sets Django up: models import after this

from prometheus_client import REGISTRY  # noqa: E402

from examples.django_project.roles import resolve_role_wsgi  # noqa: E402
from stscreds.django import wsgi_application  # noqa: E402
from stscreds.prometheus import StscredsCollector  # noqa: E402

application = wsgi_application(django_application, resolve_role=resolve_role_wsgi)
# The broker built from settings.STSCREDS, on /metrics (views.metrics). ValueError: this
# module was imported twice in one process; the first import's collector stays.
with contextlib.suppress(ValueError):
    REGISTRY.register(StscredsCollector(application.broker))
