use serde::{Deserialize, Serialize};
use std::{fmt, str::FromStr};

/// A way of delivering a notification. Each channel has its own queues, so a slow channel never
/// holds up another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Webhook,
    InApp,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Email, Channel::Webhook, Channel::InApp];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Webhook => "webhook",
            Channel::InApp => "in_app",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Channel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "email" => Ok(Channel::Email),
            "webhook" => Ok(Channel::Webhook),
            "in_app" | "in-app" => Ok(Channel::InApp),
            other => Err(format!("unknown channel `{other}` (expected email, webhook or in_app)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip() {
        for c in Channel::ALL {
            assert_eq!(c.as_str().parse::<Channel>().unwrap(), c);
        }
        assert_eq!("in-app".parse::<Channel>().unwrap(), Channel::InApp);
        assert!("sms".parse::<Channel>().unwrap_err().contains("sms"));
    }
}
