# mysite/asgi.py — replaces the file startproject wrote
import os

from async_dbbridge.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

application = get_asgi_application()
