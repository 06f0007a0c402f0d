pub mod email;
pub mod smtp;
pub mod webhook;
