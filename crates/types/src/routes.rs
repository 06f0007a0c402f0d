//! The routes file (`config/routes.toml`, path from `ROUTES_FILE`): which channels each event
//! goes to, with minijinja templates per channel. Read and checked once at start; a bad file
//! stops startup with a message naming the event and the field.
//!
//! ```toml
//! [events."password.reset".email]
//! to = "{{ payload.email }}"
//! subject = "Reset your password"
//! body = "Follow {{ payload.reset_link }}"
//!
//! [events."password.reset".in_app]
//! user = "{{ user_target }}"
//! title = "Password reset requested"
//! body = "..."
//!
//! [events."order.completed".webhook]
//! url = "${ORDER_WEBHOOK_URL:-}"      # empty: the route is off, and both binaries say so
//! secret = "${ORDER_WEBHOOK_SECRET}"
//! ```
//! `${VAR}` and `${VAR:-default}` in `url` and `secret` are read from the environment at start,
//! so secrets stay out of the file.

use crate::{
    channel::Channel,
    envelope::{EmailMessage, InAppMessage},
};
use minijinja::{Environment, UndefinedBehavior};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
#[error("routes file {file}: {message}")]
pub struct RoutesError {
    pub file: String,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    events: BTreeMap<String, BTreeMap<String, toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmail {
    to: String,
    subject: String,
    body: String,
    html: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInApp {
    user: String,
    title: String,
    body: String,
    /// The item's `data`: each value a template. Nothing of the payload is copied unless named
    /// here (a payload can hold secrets, e.g. a reset link's token).
    #[serde(default)]
    data: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    secret: Option<String>,
}

/// Where an event's webhook goes. `secret` is never logged.
#[derive(Clone)]
pub struct WebhookRoute {
    pub url: String,
    pub secret: Option<String>,
}

impl std::fmt::Debug for WebhookRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRoute")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .finish()
    }
}

/// The checked routes, with every template compiled.
#[derive(Debug)]
pub struct Routes {
    channels: BTreeMap<String, Vec<Channel>>,
    webhooks: BTreeMap<String, WebhookRoute>,
    /// Keys of each event's in-app `data`.
    in_app_data: BTreeMap<String, Vec<String>>,
    /// Routes switched off, with why: a webhook route whose URL came out empty.
    disabled: Vec<(String, Channel, String)>,
    env: Environment<'static>,
}

impl Routes {
    /// An empty set of routes (every event is unknown).
    pub fn empty() -> Routes {
        Routes {
            channels: BTreeMap::new(),
            webhooks: BTreeMap::new(),
            in_app_data: BTreeMap::new(),
            disabled: Vec::new(),
            env: new_env(),
        }
    }

    pub fn load(path: &str) -> Result<Routes, RoutesError> {
        let text = std::fs::read_to_string(path).map_err(|e| RoutesError {
            file: path.to_string(),
            message: format!("cannot read it ({e}); set ROUTES_FILE to the routes file"),
        })?;
        Self::parse(&text, path, &|k| std::env::var(k).ok())
    }

    /// Parses routes from text; `env` resolves `${VAR}` in webhook urls and secrets.
    pub fn parse(text: &str, file: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Routes, RoutesError> {
        let err = |message: String| RoutesError { file: file.to_string(), message };
        let raw: RawFile = toml::from_str(text).map_err(|e| err(format!("not valid TOML: {e}")))?;
        let mut routes = Routes::empty();
        for (event, channels) in raw.events {
            if event.is_empty() || !event.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                return Err(err(format!("event `{event}`: names may only hold letters, digits, '.', '_' and '-'")));
            }
            if channels.is_empty() {
                return Err(err(format!(
                    "event `{event}` has no channel (add [events.\"{event}\".email], .webhook or .in_app)"
                )));
            }
            let mut list = Vec::new();
            for (channel_name, value) in channels {
                let channel: Channel =
                    channel_name.parse().map_err(|e: String| err(format!("event `{event}`: {e}")))?;
                let at = |field: &str| format!("event `{event}`, {channel}.{field}");
                match channel {
                    Channel::Email => {
                        let e: RawEmail =
                            value.try_into().map_err(|e| err(format!("event `{event}`, {channel}: {e}")))?;
                        routes.add(&event, channel, "to", &e.to).map_err(|m| err(format!("{}: {m}", at("to"))))?;
                        routes
                            .add(&event, channel, "subject", &e.subject)
                            .map_err(|m| err(format!("{}: {m}", at("subject"))))?;
                        routes
                            .add(&event, channel, "body", &e.body)
                            .map_err(|m| err(format!("{}: {m}", at("body"))))?;
                        if let Some(html) = &e.html {
                            routes
                                .add(&event, channel, "html", html)
                                .map_err(|m| err(format!("{}: {m}", at("html"))))?;
                        }
                    }
                    Channel::InApp => {
                        let a: RawInApp =
                            value.try_into().map_err(|e| err(format!("event `{event}`, {channel}: {e}")))?;
                        routes
                            .add(&event, channel, "user", &a.user)
                            .map_err(|m| err(format!("{}: {m}", at("user"))))?;
                        routes
                            .add(&event, channel, "title", &a.title)
                            .map_err(|m| err(format!("{}: {m}", at("title"))))?;
                        routes
                            .add(&event, channel, "body", &a.body)
                            .map_err(|m| err(format!("{}: {m}", at("body"))))?;
                        for (key, template) in &a.data {
                            let field = format!("data.{key}");
                            routes
                                .add(&event, channel, &field, template)
                                .map_err(|m| err(format!("{}: {m}", at(&field))))?;
                        }
                        routes.in_app_data.insert(event.clone(), a.data.keys().cloned().collect());
                    }
                    Channel::Webhook => {
                        let w: RawWebhook =
                            value.try_into().map_err(|e| err(format!("event `{event}`, {channel}: {e}")))?;
                        let url = expand_env(&w.url, env).map_err(|m| err(format!("{}: {m}", at("url"))))?;
                        if url.trim().is_empty() {
                            let why = format!("its URL is empty (`{}` in {file})", w.url);
                            routes.disabled.push((event.clone(), channel, why));
                            continue;
                        }
                        let parsed = url::Url::parse(&url)
                            .map_err(|e| err(format!("{}: `{url}` is not a URL: {e}", at("url"))))?;
                        if !matches!(parsed.scheme(), "http" | "https") {
                            return Err(err(format!("{}: must be an http(s) URL", at("url"))));
                        }
                        let secret = match &w.secret {
                            Some(s) => Some(expand_env(s, env).map_err(|m| err(format!("{}: {m}", at("secret"))))?),
                            None => None,
                        }
                        .filter(|s| !s.is_empty());
                        routes.webhooks.insert(event.clone(), WebhookRoute { url, secret });
                    }
                }
                list.push(channel);
            }
            routes.channels.insert(event, list);
        }
        Ok(routes)
    }

    /// Routes that are switched off, as (event, channel, why): both binaries warn about them at
    /// start, and the API refuses an event left with no channel, saying why.
    pub fn disabled(&self) -> &[(String, Channel, String)] {
        &self.disabled
    }

    /// Logs a warning for every switched-off route.
    pub fn warn_disabled(&self) {
        for (event, channel, why) in &self.disabled {
            tracing::warn!(event, %channel, "the route of `{event}` to {channel} is off: {why}");
        }
    }

    fn add(&mut self, event: &str, channel: Channel, field: &str, source: &str) -> Result<(), String> {
        let name = template_name(event, channel, field);
        self.env.add_template_owned(name, source.to_string()).map_err(|e| format!("template does not compile: {e}"))
    }

    /// Known events, sorted.
    pub fn events(&self) -> Vec<&str> {
        self.channels.keys().map(String::as_str).collect()
    }

    pub fn channels(&self, event: &str) -> Option<&[Channel]> {
        self.channels.get(event).map(Vec::as_slice)
    }

    /// (event, channel) pairs, for the exchange bindings.
    pub fn bindings(&self) -> Vec<(String, Channel)> {
        self.channels.iter().flat_map(|(e, cs)| cs.iter().map(move |c| (e.clone(), *c))).collect()
    }

    pub fn webhook(&self, event: &str) -> Option<&WebhookRoute> {
        self.webhooks.get(event)
    }

    fn render(
        &self,
        event: &str,
        channel: Channel,
        field: &str,
        ctx: &serde_json::Value,
    ) -> Result<String, RenderError> {
        let name = template_name(event, channel, field);
        let tmpl =
            self.env.get_template(&name).map_err(|_| RenderError::NoRoute { event: event.to_string(), channel })?;
        tmpl.render(ctx).map_err(|source| RenderError::Template {
            event: event.to_string(),
            channel,
            field: field.to_string(),
            source,
        })
    }

    fn render_opt(
        &self,
        event: &str,
        channel: Channel,
        field: &str,
        ctx: &serde_json::Value,
    ) -> Result<Option<String>, RenderError> {
        if self.env.get_template(&template_name(event, channel, field)).is_err() {
            return Ok(None);
        }
        self.render(event, channel, field, ctx).map(Some)
    }

    /// The e-mail of `event`; `ctx` holds `id`, `event`, `user_target` and `payload`.
    pub fn render_email(&self, event: &str, ctx: &serde_json::Value) -> Result<EmailMessage, RenderError> {
        Ok(EmailMessage {
            to: self.render(event, Channel::Email, "to", ctx)?.trim().to_string(),
            subject: self.render(event, Channel::Email, "subject", ctx)?,
            body: self.render(event, Channel::Email, "body", ctx)?,
            html: self.render_opt(event, Channel::Email, "html", ctx)?,
        })
    }

    pub fn render_in_app(&self, event: &str, ctx: &serde_json::Value) -> Result<InAppMessage, RenderError> {
        Ok(InAppMessage {
            user: self.render(event, Channel::InApp, "user", ctx)?.trim().to_string(),
            title: self.render(event, Channel::InApp, "title", ctx)?,
            body: self.render(event, Channel::InApp, "body", ctx)?,
            data: self.render_data(event, ctx)?,
        })
    }

    /// The in-app item's `data` from the route's `data` templates; `None` when it names none.
    fn render_data(&self, event: &str, ctx: &serde_json::Value) -> Result<Option<serde_json::Value>, RenderError> {
        let keys = self.in_app_data.get(event).map(Vec::as_slice).unwrap_or_default();
        if keys.is_empty() {
            return Ok(None);
        }
        let mut data = serde_json::Map::new();
        for key in keys {
            let value = self.render(event, Channel::InApp, &format!("data.{key}"), ctx)?;
            data.insert(key.clone(), serde_json::Value::String(value));
        }
        Ok(Some(serde_json::Value::Object(data)))
    }
}

/// Why an event could not be rendered for a channel.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("event `{event}` has no {channel} route")]
    NoRoute { event: String, channel: Channel },
    #[error("rendering {channel}.{field} of `{event}` failed: {source}")]
    Template {
        event: String,
        channel: Channel,
        field: String,
        #[source]
        source: minijinja::Error,
    },
}

fn new_env() -> Environment<'static> {
    let mut env = Environment::new();
    // A template that uses a field the event lacks is an error, not an empty string in a mail.
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.add_filter("http_url", http_url);
    env
}

/// `{{ link | http_url }}`: the value when it is an absolute http or https URL, else a render
/// error (the delivery is dead-lettered with it). Links built from a payload go through it, so a
/// `javascript:` or `data:` URL never becomes an `href` in a mail.
fn http_url(value: String) -> Result<String, minijinja::Error> {
    match url::Url::parse(&value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(value),
        _ => Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("`{}` is not an http or https URL", value.chars().take(100).collect::<String>().escape_debug()),
        )),
    }
}

/// `.html` names get HTML auto-escaping; the others are plain text.
fn template_name(event: &str, channel: Channel, field: &str) -> String {
    let ext = if field == "html" { "html" } else { "txt" };
    format!("{event}/{channel}/{field}.{ext}")
}

/// Expands `${VAR}` and `${VAR:-default}`.
fn expand_env(raw: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').ok_or_else(|| format!("unclosed `${{` in `{raw}`"))? + start;
        let inner = &rest[start + 2..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match env(name).filter(|v| !v.is_empty()).or(default.map(str::to_string)) {
            Some(v) => out.push_str(&v),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GOOD: &str = r#"
[events."password.reset".email]
to = "{{ payload.email }}"
subject = "Reset your password"
body = "Hi {{ payload.name }}, go to {{ payload.reset_link }}"
html = "<a href='{{ payload.reset_link }}'>{{ payload.name }}</a>"

[events."password.reset".in_app]
user = "{{ user_target }}"
title = "Password reset requested"
body = "A reset link was sent to {{ payload.email }}"

[events."order.completed".webhook]
url = "${HOOK_URL:-http://127.0.0.1:9/hook}"
secret = "${HOOK_SECRET}"
"#;

    fn env(k: &str) -> Option<String> {
        (k == "HOOK_SECRET").then(|| "whsec_abc".to_string())
    }

    fn parse_err(text: &str) -> String {
        Routes::parse(text, "routes.toml", &env).unwrap_err().to_string()
    }

    #[test]
    fn good_file_renders_each_channel() {
        let r = Routes::parse(GOOD, "routes.toml", &env).unwrap();
        assert_eq!(r.events(), vec!["order.completed", "password.reset"]);
        assert_eq!(r.channels("password.reset").unwrap(), &[Channel::Email, Channel::InApp]);
        let ctx = json!({"user_target": "u1", "payload": {"email": "a@b.c", "name": "<Ann>", "reset_link": "https://x/r?t=1&u=2"}});
        let mail = r.render_email("password.reset", &ctx).unwrap();
        assert_eq!(mail.to, "a@b.c");
        assert_eq!(mail.body, "Hi <Ann>, go to https://x/r?t=1&u=2");
        assert!(mail.html.unwrap().contains("&lt;Ann&gt;"), "html is escaped");
        assert_eq!(r.render_in_app("password.reset", &ctx).unwrap().user, "u1");
        let hook = r.webhook("order.completed").unwrap();
        assert_eq!(hook.url, "http://127.0.0.1:9/hook");
        assert_eq!(hook.secret.as_deref(), Some("whsec_abc"));
        assert!(!format!("{hook:?}").contains("whsec_abc"), "secrets stay out of Debug");
    }

    #[test]
    fn missing_payload_field_is_a_render_error() {
        let r = Routes::parse(GOOD, "routes.toml", &env).unwrap();
        let e =
            r.render_email("password.reset", &json!({"user_target": "u1", "payload": {"email": "a@b.c"}})).unwrap_err();
        assert!(matches!(&e, RenderError::Template { event, .. } if event == "password.reset"), "{e}");
    }

    #[test]
    fn bad_files_name_the_event_and_field() {
        let e = parse_err("[events.\"a.b\".sms]\nto = \"x\"");
        assert!(e.contains("a.b") && e.contains("sms"), "{e}");
        let e = parse_err("[events.\"a.b\".email]\nto = \"{{ payload.x\"\nsubject = \"s\"\nbody = \"b\"");
        assert!(e.contains("a.b") && e.contains("email.to") && e.contains("compile"), "{e}");
        let e = parse_err("[events.\"a.b\".webhook]\nsecret = \"s\"");
        assert!(e.contains("a.b") && e.contains("url"), "{e}");
        let e = parse_err("[events.\"a.b\".webhook]\nurl = \"${NOPE}\"");
        assert!(e.contains("a.b") && e.contains("webhook.url") && e.contains("NOPE"), "{e}");
        let e = parse_err("[events.\"a.b\".webhook]\nurl = \"ftp://x\"");
        assert!(e.contains("webhook.url"), "{e}");
        let e = parse_err("[events.\"a.b\".email]\nto = \"x\"\nsubject = \"s\"");
        assert!(e.contains("a.b") && e.contains("body"), "{e}");
        let e = parse_err("[events.\"a b\".email]\nto = \"x\"\nsubject = \"s\"\nbody = \"b\"");
        assert!(e.contains("a b"), "{e}");
    }
}

#[cfg(test)]
mod shipped_file {
    #[test]
    fn the_shipped_routes_file_loads_and_renders() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml");
        let r = super::Routes::load(path).unwrap();
        assert_eq!(r.events(), vec!["order.completed", "password.reset", "user.registered"]);
        let ctx = serde_json::json!({"id": "1", "event": "user.registered", "user_target": "u1",
            "payload": {"email": "ann@example.com", "name": "Ann", "reset_link": "https://x/r"}});
        assert_eq!(r.render_email("user.registered", &ctx).unwrap().subject, "Welcome to notify, Ann!");
        assert!(r.render_email("password.reset", &ctx).unwrap().body.contains("https://x/r"));
    }

    #[test]
    fn the_shipped_routes_copy_nothing_of_the_payload_and_need_a_webhook_url() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml")).unwrap();
        let r = super::Routes::parse(&text, "routes.toml", &|_| None).unwrap();
        let ctx = serde_json::json!({"id": "1", "event": "password.reset", "user_target": "u1",
            "payload": {"email": "ann@example.com", "reset_link": "https://x/r?t=SECRET"}});
        let item = r.render_in_app("password.reset", &ctx).unwrap();
        assert_eq!(item.data, None, "no payload (and no token) in the inbox by default");
        assert_eq!(r.channels("order.completed"), Some(&[][..]), "no URL, no webhook route");
        assert!(r.disabled()[0].2.contains("ORDER_WEBHOOK_URL"), "{:?}", r.disabled());
        let r =
            super::Routes::parse(&text, "routes.toml", &|k| (k == "ORDER_WEBHOOK_URL").then(|| "https://h/o".into()))
                .unwrap();
        assert_eq!(r.channels("order.completed"), Some(&[crate::channel::Channel::Webhook][..]));
    }

    #[test]
    fn in_app_data_comes_from_the_routes_templates_only() {
        let text = "[events.\"a.b\".in_app]\nuser = \"u\"\ntitle = \"t\"\nbody = \"b\"\ndata = { order = \"{{ payload.order }}\" }";
        let r = super::Routes::parse(text, "f", &|_| None).unwrap();
        let ctx = serde_json::json!({"payload": {"order": 42, "token": "SECRET"}});
        assert_eq!(r.render_in_app("a.b", &ctx).unwrap().data, Some(serde_json::json!({"order": "42"})));
    }

    #[test]
    fn shipped_links_are_http_only() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/routes.toml");
        let r = super::Routes::load(path).unwrap();
        for bad in ["javascript:alert(1)", "JavaScript:alert(1)", "data:text/html,x", "/relative", "http://"] {
            let ctx = serde_json::json!({"id": "1", "event": "password.reset", "user_target": "u1",
                "payload": {"email": "ann@example.com", "reset_link": bad}});
            let e = r.render_email("password.reset", &ctx).unwrap_err().to_string();
            assert!(e.contains("not an http or https URL"), "{bad}: {e}");
        }
    }
}
