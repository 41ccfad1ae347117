"""ASGI entry point: ``uvicorn examples.django_project.asgi:application`` (repository root).

CredentialsMiddleware answers the lifespan protocol itself (Django cannot) and runs the
STSCREDS["WARM_UP"] fetches at start-up.
"""

import contextlib
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_project.settings")
django_application = get_asgi_application()  # sets Django up: models import after this

from prometheus_client import REGISTRY  # noqa: E402

from examples.django_project.roles import resolve_role_asgi  # noqa: E402
from stscreds.django import asgi_application  # noqa: E402
from stscreds.prometheus import StscredsCollector  # noqa: E402

application = asgi_application(django_application, resolve_role=resolve_role_asgi)
# The broker built from settings.STSCREDS, on /metrics (views.metrics). ValueError: this
# module was imported twice in one process; the first import's collector stays.
with contextlib.suppress(ValueError):
    REGISTRY.register(StscredsCollector(application.broker))
