# asgi.py — serve with: uvicorn mysite.asgi:application
from async_dbbridge.asgi import get_asgi_application

application = get_asgi_application()
