//! The generated bad requests: endpoints, the valid bodies they start from, and every family
//! of mutation. Seeded, so every run sends the same cases.

use rand::{rngs::StdRng, Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};

const SEED: u64 = 0x6e6f_7469_6679;
/// The API's default body limit (API_MAX_BODY_BYTES).
const LIMIT: usize = 256 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A string field; `max` in characters, `single_line` refuses CR/LF.
    Str { max: Option<usize>, single_line: bool, required: bool },
    /// A JSON object (the event payload).
    Object,
    /// Any JSON value; only `null`/missing is wrong when required.
    Any { required: bool },
}

pub(super) struct Endpoint {
    pub(super) path: &'static str,
    pub(super) valid: Value,
    fields: Vec<(&'static str, Kind)>,
}

pub(super) fn endpoints() -> Vec<Endpoint> {
    let s = |max, single_line, required| Kind::Str { max, single_line, required };
    let event = || Endpoint {
        path: "/api/v1/events",
        valid: json!({"event": "user.registered", "user_target": "user-1",
                      "payload": {"email": "someone@example.com", "name": "Someone"}}),
        fields: vec![
            ("event", s(Some(200), true, true)),
            ("user_target", s(Some(128), true, true)),
            ("payload", Kind::Object),
        ],
    };
    vec![
        Endpoint {
            path: "/api/v1/notifications/email",
            valid: json!({"to": "someone@example.com", "subject": "Hello", "body": "Body text"}),
            fields: vec![
                ("to", s(Some(254), true, true)),
                ("subject", s(Some(998), true, true)),
                ("body", s(None, false, true)),
                ("html", s(None, false, false)),
            ],
        },
        Endpoint {
            path: "/api/v1/notifications/webhook",
            valid: json!({"url": "http://127.0.0.1:9/hook", "payload": {"order": 1}}),
            fields: vec![("url", s(Some(2048), true, true)), ("payload", Kind::Any { required: true })],
        },
        Endpoint {
            path: "/api/v1/notifications/in-app",
            valid: json!({"user": "user-1", "title": "Title", "body": "Body", "data": {"k": "v"}}),
            fields: vec![
                ("user", s(Some(128), true, true)),
                ("title", s(Some(200), false, true)),
                ("body", s(Some(10_000), false, true)),
                ("data", Kind::Any { required: false }),
            ],
        },
        event(),
        Endpoint { path: "/events", ..event() },
    ]
}

#[derive(Clone)]
pub(super) enum Auth {
    Good,
    Missing,
    Header(reqwest::header::HeaderValue),
}

pub(super) struct Case {
    pub(super) family: &'static str,
    pub(super) what: String,
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) content_type: Option<String>,
    pub(super) auth: Auth,
    pub(super) body: Vec<u8>,
    /// The exact status; `None`: any non-5xx (GETs that may answer 200).
    pub(super) expect: Option<u16>,
}

impl Case {
    fn post(family: &'static str, what: impl Into<String>, path: &str, body: Vec<u8>, expect: u16) -> Case {
        Case {
            family,
            what: what.into(),
            method: Method::POST,
            path: path.to_string(),
            content_type: Some("application/json".into()),
            auth: Auth::Good,
            body,
            expect: Some(expect),
        }
    }

    fn json(family: &'static str, what: impl Into<String>, path: &str, body: &Value, expect: u16) -> Case {
        Case::post(family, what, path, body.to_string().into_bytes(), expect)
    }

    fn get(family: &'static str, what: impl Into<String>, path: String, expect: Option<u16>) -> Case {
        Case {
            family,
            what: what.into(),
            method: Method::GET,
            path,
            content_type: None,
            auth: Auth::Good,
            body: Vec::new(),
            expect,
        }
    }
}

fn with(base: &Value, key: &str, value: Value) -> Value {
    let mut v = base.clone();
    v[key] = value;
    v
}

fn without(base: &Value, key: &str) -> Value {
    let mut v = base.clone();
    v.as_object_mut().unwrap().remove(key);
    v
}

/// The valid body with `key` set to the raw JSON text `raw` (for text serde_json would not
/// write, such as lone surrogate escapes or invalid UTF-8).
fn with_raw(base: &Value, key: &str, raw: &[u8]) -> Vec<u8> {
    let marker = "\u{1}__raw__\u{1}";
    let text = with(base, key, marker.into()).to_string();
    let quoted = serde_json::to_string(marker).unwrap();
    let (before, after) = text.split_once(&quoted).unwrap();
    [before.as_bytes(), raw, after.as_bytes()].concat()
}

/// A required field other than `key` (so that removing it makes any body invalid).
fn other_required(ep: &Endpoint, key: &str) -> &'static str {
    ep.fields
        .iter()
        .find(|(name, kind)| {
            *name != key
                && matches!(kind, Kind::Str { required: true, .. } | Kind::Object | Kind::Any { required: true })
        })
        .map(|(name, _)| *name)
        .unwrap()
}

fn nested(depth: usize, open: &str, close: &str, inner: &str) -> String {
    format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
}

fn mutated_json(rng: &mut StdRng, ep: &Endpoint, n: usize) -> Vec<Case> {
    const SIGNIFICANT: &[u8] = b"{}[]\",:\\ \x00\xff0en";
    let valid = ep.valid.to_string().into_bytes();
    let mut out = Vec::new();
    // Bounded: most mutations break the JSON; those that do not are skipped.
    for _ in 0..n * 20 {
        if out.len() == n {
            break;
        }
        let mut b = valid.clone();
        let mut ops = Vec::new();
        for _ in 0..rng.random_range(1..=3) {
            if b.is_empty() {
                break;
            }
            let at = rng.random_range(0..b.len());
            match rng.random_range(0..5) {
                0 => {
                    b[at] ^= 1 << rng.random_range(0..8);
                    ops.push(format!("flip@{at}"));
                }
                1 => {
                    b.truncate(at);
                    ops.push(format!("truncate@{at}"));
                }
                2 => {
                    let c = SIGNIFICANT[rng.random_range(0..SIGNIFICANT.len())];
                    b.insert(at, c);
                    ops.push(format!("insert {c:#04x}@{at}"));
                }
                3 => {
                    b.remove(at);
                    ops.push(format!("delete@{at}"));
                }
                _ => {
                    let end = rng.random_range(at..=b.len());
                    let slice = b[at..end].to_vec();
                    b.splice(at..at, slice);
                    ops.push(format!("duplicate {at}..{end}"));
                }
            }
        }
        if serde_json::from_slice::<Value>(&b).is_err() {
            out.push(Case::post("mutated json", ops.join(","), ep.path, b, 400));
        }
    }
    assert_eq!(out.len(), n, "generated {n} broken bodies for {}", ep.path);
    out
}

fn wrong_types(ep: &Endpoint) -> Vec<Case> {
    let mut out = Vec::new();
    let non_strings = [
        json!(true),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(1e308),
        json!([]),
        json!(["x"]),
        json!({}),
        json!({"x": "y"}),
    ];
    for (name, kind) in &ep.fields {
        let wrong: Vec<Value> = match kind {
            Kind::Str { required, .. } => {
                let mut w = non_strings.to_vec();
                if *required {
                    w.push(Value::Null);
                }
                w
            }
            Kind::Object => vec![Value::Null, json!(true), json!(1), json!("text"), json!([]), json!([{"a": 1}])],
            Kind::Any { required: true } => vec![Value::Null],
            Kind::Any { required: false } => vec![],
        };
        for value in wrong {
            out.push(Case::json("wrong type", format!("{name}={value}"), ep.path, &with(&ep.valid, name, value), 422));
        }
        if !matches!(kind, Kind::Str { required: false, .. } | Kind::Any { required: false }) {
            out.push(Case::json("wrong type", format!("missing {name}"), ep.path, &without(&ep.valid, name), 422));
        }
    }
    for (what, extra) in [("unknown field", "extra"), ("field in other case", "TO"), ("field with a space", "to ")] {
        out.push(Case::json("wrong type", what, ep.path, &with(&ep.valid, extra, json!(1)), 422));
    }
    for body in [json!([]), json!([ep.valid]), json!("text"), json!(1), Value::Null, json!(true), json!({})] {
        out.push(Case::json("wrong type", format!("body {body}"), ep.path, &body, 422));
    }
    out
}

fn huge(ep: &Endpoint) -> Vec<Case> {
    let mut out = Vec::new();
    let base_len = ep.valid.to_string().len();
    for (name, kind) in &ep.fields {
        // Over the limit: 413 whatever the field.
        let over = with(&ep.valid, name, "x".repeat(LIMIT + 1024).into());
        out.push(Case::json("huge", format!("{name} over the limit"), ep.path, &over, 413));
        if let Kind::Str { max: Some(max), .. } = kind {
            // Just under the limit, past the field's own cap: 422.
            let under = with(&ep.valid, name, "y".repeat(LIMIT - base_len - 64).into());
            assert!(under.to_string().len() < LIMIT);
            out.push(Case::json("huge", format!("{name} just under the limit"), ep.path, &under, 422));
            // One past the cap, counted in characters (a 4-byte emoji is one).
            let past = with(&ep.valid, name, "😀".repeat(max + 1).into());
            out.push(Case::json("huge", format!("{name}: {} emoji", max + 1), ep.path, &past, 422));
        } else {
            // No cap of its own: just under the limit is fine, so another defect makes it bad.
            let other = other_required(ep, name);
            let filler: Value = match kind {
                Kind::Object => json!({"big": "z".repeat(LIMIT - base_len - 64)}),
                _ => "z".repeat(LIMIT - base_len - 64).into(),
            };
            let under = without(&with(&ep.valid, name, filler), other);
            assert!(under.to_string().len() < LIMIT);
            out.push(Case::json("huge", format!("{name} just under the limit, no {other}"), ep.path, &under, 422));
        }
    }
    // The boundary itself: exactly the limit is read (and refused for its content), one byte
    // more is 413. The padding goes into the first field with a cap.
    let (capped, _) = ep.fields.iter().find(|(_, k)| matches!(k, Kind::Str { max: Some(_), .. })).unwrap();
    for (total, status) in [(LIMIT, 422), (LIMIT + 1, 413)] {
        let mut body = with(&ep.valid, capped, "".into());
        let pad = total - body.to_string().len();
        body[*capped] = "p".repeat(pad).into();
        assert_eq!(body.to_string().len(), total);
        out.push(Case::json("huge", format!("body of exactly {total} bytes"), ep.path, &body, status));
    }
    // Many small things instead of one big one.
    let mut many = ep.valid.clone();
    for i in 0..10_000 {
        many[format!("k{i}")] = json!(i);
    }
    out.push(Case::json("huge", "10000 unknown fields", ep.path, &many, 422));
    out
}

fn unicode(ep: &Endpoint) -> Vec<Case> {
    let mut out = Vec::new();
    for (name, kind) in &ep.fields {
        let Kind::Str { .. } = kind else {
            // NUL deep inside an object or value (stored as jsonb for the inbox, which refuses it).
            let v = json!({"nested": {"deep": ["ok", "nul\u{0}here"]}});
            out.push(Case::json("unicode", format!("NUL inside {name}"), ep.path, &with(&ep.valid, name, v), 422));
            continue;
        };
        let base = ep.valid[*name].as_str().unwrap_or("text").to_string();
        for (what, s) in [("NUL at the end", format!("{base}\u{0}")), ("NUL alone", "\u{0}".to_string())] {
            out.push(Case::json("unicode", format!("{name}: {what}"), ep.path, &with(&ep.valid, name, s.into()), 422));
        }
        for raw in [r#""\ud800""#, r#""a\udfffb""#, r#""\ud83d x""#, r#""\ude00\ud83d""#, r#""\ud800\u0041""#] {
            out.push(Case::post(
                "unicode",
                format!("{name}: lone surrogate {raw}"),
                ep.path,
                with_raw(&ep.valid, name, raw.as_bytes()),
                400,
            ));
        }
        for raw in [&b"\"\xff\""[..], b"\"\xc0\x80\"", b"\"\xe2\x82\"", b"\"\xed\xa0\x80\""] {
            out.push(Case::post(
                "unicode",
                format!("{name}: invalid UTF-8 {raw:?}"),
                ep.path,
                with_raw(&ep.valid, name, raw),
                400,
            ));
        }
    }
    let mut bom = "\u{feff}".as_bytes().to_vec();
    bom.extend(ep.valid.to_string().into_bytes());
    out.push(Case::post("unicode", "byte order mark", ep.path, bom, 400));
    // RTL marks and emoji where they make the request wrong.
    let strange = ["\u{202e}", "\u{200f}", "😀", "\u{2066}", "e\u{301}\u{301}\u{301}"];
    for s in strange {
        match ep.path {
            "/api/v1/notifications/email" => {
                for to in
                    [format!("{s}someone@example.com"), format!("some{s}one@example.com"), format!("a@exa{s}mple.com")]
                {
                    // Emoji and accents are fine in an internationalised domain; bidi controls
                    // are not (IDNA refuses them).
                    let bidi = s.chars().all(
                        |c| matches!(c, '\u{200e}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'),
                    );
                    if to.starts_with("a@") && !bidi {
                        continue;
                    }
                    out.push(Case::json(
                        "unicode",
                        format!("to={to:?}"),
                        ep.path,
                        &with(&ep.valid, "to", to.into()),
                        422,
                    ));
                }
            }
            "/api/v1/notifications/webhook" => {
                let url = format!("ht{s}tp://127.0.0.1:9/hook");
                out.push(Case::json(
                    "unicode",
                    format!("url={url:?}"),
                    ep.path,
                    &with(&ep.valid, "url", url.into()),
                    422,
                ));
            }
            "/api/v1/notifications/in-app" => {
                let t = s.repeat(201 / s.chars().count() + 1);
                out.push(Case::json(
                    "unicode",
                    format!("title of {} chars", t.chars().count()),
                    ep.path,
                    &with(&ep.valid, "title", t.into()),
                    422,
                ));
            }
            _ => {
                let event = format!("user.{s}registered");
                out.push(Case::json(
                    "unicode",
                    format!("event={event:?}"),
                    ep.path,
                    &with(&ep.valid, "event", event.into()),
                    422,
                ));
            }
        }
    }
    out
}

fn line_breaks(ep: &Endpoint) -> Vec<Case> {
    let mut out = Vec::new();
    for (name, kind) in &ep.fields {
        let Kind::Str { single_line: true, .. } = kind else { continue };
        let base = ep.valid[*name].as_str().unwrap().to_string();
        for (what, s) in [
            ("CRLF header injection", format!("{base}\r\nBcc: victim@example.com")),
            ("LF", format!("{base}\nX")),
            ("CR", format!("{base}\rX")),
            ("trailing CRLF", format!("{base}\r\n")),
            ("leading LF", format!("\n{base}")),
        ] {
            out.push(Case::json("cr/lf", format!("{name}: {what}"), ep.path, &with(&ep.valid, name, s.into()), 422));
        }
    }
    let key = ep.fields[0].0;
    let mut obj = without(&ep.valid, key);
    obj[format!("{key}\r\n")] = ep.valid[key].clone();
    out.push(Case::json("cr/lf", format!("key {key:?} with CRLF"), ep.path, &obj, 422));
    out
}

fn deep(ep: &Endpoint) -> Vec<Case> {
    let mut out = Vec::new();
    for depth in [129, 10_000, 100_000] {
        for (what, open, close, inner) in [("arrays", "[", "]", ""), ("objects", "{\"a\":", "}", "1")] {
            let body = nested(depth, open, close, inner).into_bytes();
            // 100,000 nested objects are past the body limit before they are too deep.
            let status = if body.len() > LIMIT { 413 } else { 400 };
            out.push(Case::post("deep json", format!("{depth} nested {what} as the body"), ep.path, body, status));
        }
    }
    // Around serde_json's recursion limit (128), in a string field: a wrong type (422) while it
    // parses, malformed (400) past the limit.
    let (text_field, _) = ep.fields.iter().find(|(_, k)| matches!(k, Kind::Str { .. })).unwrap();
    for (depth, status) in [(100, 422), (126, 422), (127, 400), (128, 400), (129, 400), (10_000, 400)] {
        let raw = nested(depth, "[", "]", "");
        out.push(Case::post(
            "deep json",
            format!("{text_field}: {depth} nested arrays"),
            ep.path,
            with_raw(&ep.valid, text_field, raw.as_bytes()),
            status,
        ));
    }
    // Deep inside a field that takes any JSON: past the limit it is malformed.
    for (name, kind) in &ep.fields {
        if matches!(kind, Kind::Any { .. } | Kind::Object) {
            let raw = format!("{{\"deep\":{}}}", nested(10_000, "[", "]", "0"));
            out.push(Case::post(
                "deep json",
                format!("{name}: 10000 nested arrays"),
                ep.path,
                with_raw(&ep.valid, name, raw.as_bytes()),
                400,
            ));
        }
    }
    out
}

fn methods(ep: &Endpoint) -> Vec<Case> {
    let mut out = Vec::new();
    for method in ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"] {
        let mut c = Case::json("wrong method", method, ep.path, &ep.valid, 405);
        c.method = Method::from_bytes(method.as_bytes()).unwrap();
        out.push(c);
        let mut c = Case::json("wrong method", format!("{method} without a key"), ep.path, &ep.valid, 401);
        c.method = Method::from_bytes(method.as_bytes()).unwrap();
        c.auth = Auth::Missing;
        out.push(c);
    }
    out
}

fn content_types(ep: &Endpoint) -> Vec<Case> {
    let mut out = Vec::new();
    for ct in [
        None,
        Some(""),
        Some("text/plain"),
        Some("text/json"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/xml"),
        Some("application/jsonp"),
        Some("application/json-seq"),
        Some("application/ json"),
        Some("json"),
        Some("*/*"),
        Some("application/*"),
    ] {
        let mut c = Case::json("content type", format!("{ct:?}"), ep.path, &ep.valid, 415);
        c.content_type = ct.map(str::to_string);
        out.push(c);
    }
    out
}

fn auth(ep: &Endpoint) -> Vec<Case> {
    use reqwest::header::HeaderValue;
    let mut values: Vec<HeaderValue> = [
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        "Basic dGVzdC1rZXktb25lLTRmMWQ5Yzo=",
        "Bearer test-key-one-4f1d9cX",
        "Bearer test-key-one-4f1d9",
        "Bearer TEST-KEY-ONE-4F1D9C",
        "Token test-key-one-4f1d9c",
        "test-key-one-4f1d9c",
        "Bearer test-key-one-4f1d9c,test-key-two-8e2a7b",
        "Bearer test-key-one-4f1d9c test-key-two-8e2a7b",
    ]
    .into_iter()
    .map(HeaderValue::from_static)
    .collect();
    values.push(HeaderValue::from_bytes(b"Bearer test-key-one-4f1d9c\xff").unwrap());
    values.push(HeaderValue::from_str(&format!("Bearer {}", "k".repeat(8 * 1024))).unwrap());
    let mut out = Vec::new();
    let mut missing = Case::json("auth", "no Authorization", ep.path, &ep.valid, 401);
    missing.auth = Auth::Missing;
    out.push(missing);
    for v in values {
        let mut c = Case::json("auth", format!("{v:?}").chars().take(60).collect::<String>(), ep.path, &ep.valid, 401);
        c.auth = Auth::Header(v);
        out.push(c);
    }
    out
}

fn inbox_queries(rng: &mut StdRng) -> Vec<Case> {
    let mut out = Vec::new();
    let list = |user: &str, query: &str| format!("/api/v1/users/{user}/notifications{query}");
    let uuid = "0190b5d2-7f4e-7000-8000-000000000000";
    let bad_queries = [
        "?limit=abc",
        "?limit=0",
        "?limit=-1",
        "?limit=101",
        "?limit=1e3",
        "?limit=99999999999999999999",
        "?limit=",
        "?limit=1&limit=2",
        "?limit=%00",
        "?limit=%F0%9F%98%80",
        "?unread=maybe",
        "?unread=1",
        "?unread=",
        "?unknown=1",
        "?cursor=garbage",
        "?cursor=",
        "?cursor=_",
        "?cursor=1_zzz",
        "?cursor=%00",
        "?cursor=%E2%80%AE123_abc",
        "?cursor=9999999999999999999_0190b5d27f4e70008000000000000000",
        "?cursor=9223372036854775807_0190b5d27f4e70008000000000000000",
        "?cursor=-9223372036854775808_0190b5d27f4e70008000000000000000",
        "?limit=10&cursor=garbage&unread=true",
        "?%ZZ=1",
    ];
    for q in bad_queries {
        out.push(Case::get("query", q, list("user-1", q), Some(422)));
    }
    // Cursors that decode but lie far outside what Postgres can store, or at its edges.
    for (micros, status) in [
        (-6_000_000_000_000_000_000_i64, 422),
        (-210_000_000_000_000_000, 422),
        (253_402_300_799_999_999, 200),
        (8_000_000_000_000_000_000, 422),
    ] {
        let q = format!("?cursor={micros}_{}", uuid.replace('-', ""));
        out.push(Case::get("query", q.clone(), list("user-1", &q), Some(status)));
    }
    for _ in 0..30 {
        let len = rng.random_range(1..200);
        let garbage: String = (0..len).map(|_| format!("%{:02X}", rng.random::<u8>())).collect();
        out.push(Case::get("query", "random cursor bytes", list("user-1", &format!("?cursor={garbage}")), None));
        let len = rng.random_range(1..40);
        let garbage: String = (0..len).map(|_| format!("%{:02X}", rng.random::<u8>())).collect();
        out.push(Case::get("query", "random query bytes", list("user-1", &format!("?{garbage}")), None));
    }
    // Strange users: the inbox of a user nobody wrote to is empty (200), or a clear 4xx.
    let users = [
        "%E2%80%AEuser",
        "%F0%9F%98%80",
        "%E2%80%8F%D7%A9%D7%9C%D7%95%D7%9D",
        "%00",
        "user%00x",
        "%FF",
        "%C0%80",
        "%ED%A0%80",
        "a%0D%0Ab",
        "%20",
        "..",
        "%2E%2E%2F%2E%2E",
    ];
    for user in users {
        out.push(Case::get("user", format!("list {user}"), list(user, ""), None));
        out.push(Case::post(
            "user",
            format!("read-all {user}"),
            &format!("/api/v1/users/{user}/notifications/read-all"),
            Vec::new(),
            0,
        ));
        out.push(Case::post(
            "user",
            format!("read {user}"),
            &format!("/api/v1/users/{user}/notifications/{uuid}/read"),
            Vec::new(),
            0,
        ));
    }
    let long_user = "u".repeat(4000);
    out.push(Case::get("user", "list of a 4000-char user", list(&long_user, ""), None));
    for id in ["not-a-uuid", "%00", "%FF", "0190b5d2-7f4e-7000-8000-00000000000Z"] {
        out.push(Case::get("user", format!("status of {id}"), format!("/api/v1/notifications/{id}"), Some(404)));
    }
    // `expect: Some(0)` above marks "any non-5xx" for the read endpoints too.
    for c in &mut out {
        if c.expect == Some(0) {
            c.expect = None;
        }
    }
    out
}

pub(super) fn generate() -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut cases = Vec::new();
    for ep in &endpoints() {
        cases.extend(mutated_json(&mut rng, ep, 80));
        cases.extend(wrong_types(ep));
        cases.extend(huge(ep));
        cases.extend(unicode(ep));
        cases.extend(line_breaks(ep));
        cases.extend(deep(ep));
        cases.extend(methods(ep));
        cases.extend(content_types(ep));
        cases.extend(auth(ep));
    }
    cases.extend(inbox_queries(&mut rng));
    cases
}
