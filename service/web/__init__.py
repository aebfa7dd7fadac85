"""The operators' web page (server-rendered, outside ``/v1``): see :mod:`service.web.routes`."""
