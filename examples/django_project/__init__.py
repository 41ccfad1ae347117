"""A Django project using stscreds under ASGI (asgi.py) and WSGI (wsgi.py).

Set up, from the repository root (an SQLite file; a user per tenant role)::

    python examples/django_project/manage.py migrate
    python examples/django_project/manage.py add_tenant alice \
        arn:aws:iam::123456789012:role/tenant-acme tenant-acme

Run, from the repository root (port 8000, the default issuer's; elsewhere set
STSCREDS_ISSUER to the URL the app is served at), one of::

    uvicorn examples.django_project.asgi:application
    gunicorn --threads 8 examples.django_project.wsgi:application
    python examples/django_project/manage.py runserver

Routes (urls.py; Django's views take any method, the example sends GET):

- /whoami: the credentials of the X-User header's tenant role,
  ``{"access_key_id_tail", "expiration"}``; 403 for a request without X-User, or for a user
  unknown, inactive or without a tenant.
- /objects: the keys of that user's bucket (add_tenant's third argument), listed with the
  tenant role's credentials.
- /metrics: every metric of the default Prometheus registry, stscreds_* included.
- /.well-known/openid-configuration and /.well-known/jwks.json (under the issuer URL's
  path, if it has one): the issuer's OIDC documents, answered by the stscreds middleware.

Environment variables: see settings.py (STSCREDS_ISSUER, STSCREDS_KEY_FILE,
STSCREDS_STS_ENDPOINT, STSCREDS_REGION, STSCREDS_S3_ENDPOINT, STSCREDS_WARM_UP,
STSCREDS_DJANGO_DB, DJANGO_SECRET_KEY); DJANGO_SETTINGS_MODULE defaults to
examples.django_project.settings.
"""
