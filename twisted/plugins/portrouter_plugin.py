from twisted.application.service import ServiceMaker

portrouter = ServiceMaker(
    "portrouter",
    "portrouter.tap",
    "Route HTTP, TCP, UDP and WebSocket traffic to the services of deployed projects.",
    "portrouter",
)

portrouter_tunnel = ServiceMaker(
    "portrouter-tunnel",
    "portrouter.tunnel",
    "Carry local TCP connections to a portrouter service port, one WebSocket each.",
    "portrouter-tunnel",
)
