"""The async_dbbridge demo project: a small shop served by uvicorn."""
