"""The API's routers, one module per tag: search, images, labels, system and the web page."""
