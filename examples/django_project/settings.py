"""Django settings for the stscreds example; configuration comes from the environment.

| variable              | default                               | meaning                          |
|-----------------------|---------------------------------------|----------------------------------|
| STSCREDS_ISSUER       | http://127.0.0.1:8000                 | issuer URL: where the app serves |
| STSCREDS_KEY_FILE     | (none: a throwaway key)               | PEM signing key                  |
| STSCREDS_STS_ENDPOINT | (none: regional AWS STS)              | STS endpoint override            |
| STSCREDS_REGION       | us-east-1                             | STS's and S3's region            |
| STSCREDS_S3_ENDPOINT  | (none: AWS S3)                        | S3 endpoint override             |
| STSCREDS_WARM_UP      | (none)                                | role ARNs for start-up (a,b,c)   |
| STSCREDS_DJANGO_DB    | <temp dir>/stscreds-django-example.db | the SQLite database file         |
| DJANGO_SECRET_KEY     | a fixed, public example value         | Django's SECRET_KEY              |

They mean what they mean for the other examples (examples/settings.py), except that
STSCREDS_WARM_UP names role ARNs, not tenants: a request's role comes from the database
(manage.py add_tenant), so STSCREDS_ACCOUNT_ID is not used.
stscreds is not in INSTALLED_APPS: it needs no app entry (see stscreds.django).
"""

import os
import tempfile
from pathlib import Path

from examples.settings import signing_key

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "stscreds-example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "examples.django_project.tenants",
]
# The example authenticates with an X-User header in resolve_role (see roles.py), so it
# needs no session, CSRF or auth middleware.
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "examples.django_project.urls"
# manage.py runserver serves this application (Django wrapped by stscreds), not a bare one.
WSGI_APPLICATION = "examples.django_project.wsgi.application"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("STSCREDS_DJANGO_DB")
        or str(Path(tempfile.gettempdir()) / "stscreds-django-example.db"),
    }
}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

STSCREDS = {
    "ISSUER": os.environ.get("STSCREDS_ISSUER", "http://127.0.0.1:8000"),
    # A key from STSCREDS_KEY_FILE (python -m stscreds keygen), else a throwaway one.
    "SIGNING_KEYS": [signing_key()],
    "STS_ENDPOINT_URL": os.environ.get("STSCREDS_STS_ENDPOINT") or None,
    "REGION": os.environ.get("STSCREDS_REGION", "us-east-1"),
    # The subject (sub claim) of every token: trust policies can require it.
    "DEFAULT_SUBJECT": "django-example",
    "WARM_UP": [arn for arn in os.environ.get("STSCREDS_WARM_UP", "").split(",") if arn],
}
S3_ENDPOINT_URL = os.environ.get("STSCREDS_S3_ENDPOINT") or None
