pub mod email;
pub mod webhook;
