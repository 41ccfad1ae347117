from django.urls import path

from examples.django_project import views

urlpatterns = [
    path("whoami", views.whoami),
    path("objects", views.objects),
    path("metrics", views.metrics),
]
