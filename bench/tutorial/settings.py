"""The tutorial's configuration: daphne + channels-redis RedisChannelLayer, as it sets it up."""

import os

SECRET_KEY = "bench-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["daphne", "django.contrib.auth", "django.contrib.contenttypes", "channels"]
ASGI_APPLICATION = "bench.tutorial.asgi.application"
DATABASES = {}
USE_TZ = True
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [os.environ["REDIS_URL"]]},
    },
}
