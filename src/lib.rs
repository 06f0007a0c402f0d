//! The root package only holds the end-to-end tests in `tests/`, which drive the API and the
//! worker together against a real RabbitMQ and a real SMTP server.
