from django.urls import path

from . import views

urlpatterns = [
    path("users/<int:user_id>/welcome", views.welcome),
    path("users/<int:user_id>/welcome-after-commit", views.welcome_after_commit),
    path("jobs/<int:job_id>", views.job_status),
]
