"""The example's routes: /whoami, /objects (send X-User) and /metrics (views.py).

The stscreds middleware (asgi.py, wsgi.py) answers /.well-known/openid-configuration and
/.well-known/jwks.json before Django sees the request.
"""

from django.urls import path

from examples.django_project import views

urlpatterns = [
    path("whoami", views.whoami),
    path("objects", views.objects),
    path("metrics", views.metrics),
]
