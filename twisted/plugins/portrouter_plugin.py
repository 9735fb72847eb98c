from twisted.application.service import ServiceMaker

portrouter = ServiceMaker(
    "portrouter",
    "portrouter.tap",
    "Route HTTP, TCP, UDP and WebSocket traffic to the services of deployed projects.",
    "portrouter",
)
