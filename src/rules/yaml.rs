//! envoyproxy/ratelimit's YAML rules format, read unchanged, plus sluice's
//! extensions, each off unless written: `algorithm` and `burst` in
//! `rate_limit`, windows of several units (`unit_multiplier`) or of the
//! calendar (`calendar`, `time_zone`), and several limits on one descriptor
//! (`rate_limits`). docs/rules.md describes them.
//!
//! Parsing is two passes: serde reads the structure (unknown fields, bad
//! types and duplicate keys fail with their path), then a walk checks the
//! meaning and builds the lookup tree, collecting every error it finds.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::{RuleError, RuleErrors};
use crate::limiter::{
    Algorithm, Calendar, CalendarUnit, Limit, Metadata, Unit, Window, MAX_WINDOW_SECONDS,
};
use crate::limiter::{Level, Node, Rule, RuleLimit, RuleSet, ValueMatch};

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YamlRoot {
    #[serde(default, deserialize_with = "opt_scalar")]
    pub domain: Option<String>,
    #[serde(default, deserialize_with = "opt_list")]
    pub descriptors: Vec<YamlDescriptor>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YamlDescriptor {
    #[serde(default, deserialize_with = "opt_scalar")]
    pub key: Option<String>,
    #[serde(
        default,
        deserialize_with = "opt_scalar",
        skip_serializing_if = "Option::is_none"
    )]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<YamlRateLimit>,
    /// sluice extension: several limits, all of which must admit a hit (a
    /// burst and a daily limit); instead of `rate_limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<Vec<YamlRateLimit>>,
    #[serde(
        default,
        deserialize_with = "opt_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub descriptors: Vec<YamlDescriptor>,
    #[serde(
        default,
        deserialize_with = "yaml11_bool",
        skip_serializing_if = "is_false"
    )]
    pub shadow_mode: bool,
    #[serde(
        default,
        deserialize_with = "yaml11_bool",
        skip_serializing_if = "is_false"
    )]
    pub quota_mode: bool,
    /// Accepted for compatibility. sluice's metric labels carry the rule path
    /// from the configuration, never request values, so these add nothing.
    #[serde(
        default,
        deserialize_with = "yaml11_bool",
        skip_serializing_if = "is_false"
    )]
    pub detailed_metric: bool,
    #[serde(
        default,
        deserialize_with = "yaml11_bool",
        skip_serializing_if = "is_false"
    )]
    pub value_to_metric: bool,
    /// On a wildcard value: every matching value shares one counter.
    #[serde(
        default,
        deserialize_with = "yaml11_bool",
        skip_serializing_if = "is_false"
    )]
    pub share_threshold: bool,
    /// Free-form: strings, numbers, booleans, null, lists and maps.
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YamlRateLimit {
    #[serde(
        default,
        deserialize_with = "opt_scalar",
        skip_serializing_if = "Option::is_none"
    )]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_unit: Option<u64>,
    #[serde(
        default,
        deserialize_with = "yaml11_bool",
        skip_serializing_if = "is_false"
    )]
    pub unlimited: bool,
    #[serde(
        default,
        deserialize_with = "opt_scalar",
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<String>,
    #[serde(
        default,
        deserialize_with = "opt_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub replaces: Vec<YamlReplaces>,
    /// sluice extension: `sliding_window` (server default), `fixed_window`, `gcra`.
    #[serde(
        default,
        deserialize_with = "opt_scalar",
        skip_serializing_if = "Option::is_none"
    )]
    pub algorithm: Option<String>,
    /// sluice extension: the GCRA bucket size (default: `requests_per_unit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// sluice extension: a window of this many `unit`s (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_multiplier: Option<u64>,
    /// sluice extension: a calendar window (`day`, `week`, `month`) instead
    /// of `unit`, starting at midnight in `time_zone`.
    #[serde(
        default,
        deserialize_with = "opt_scalar",
        skip_serializing_if = "Option::is_none"
    )]
    pub calendar: Option<String>,
    /// sluice extension: the tz database zone of a calendar window (default UTC).
    #[serde(
        default,
        deserialize_with = "opt_scalar",
        skip_serializing_if = "Option::is_none"
    )]
    pub time_zone: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YamlReplaces {
    #[serde(default, deserialize_with = "opt_scalar")]
    pub name: Option<String>,
}

/// A scalar's text exactly as written. serde_yaml_ng hands a plain scalar to
/// a string as its source text (`1.50`, `0x1F`, `007`), which is what Go's
/// yaml does for envoyproxy/ratelimit; going through `serde_yaml_ng::Value`
/// would normalise numbers first (`1.50` -> "1.5", `0x1F` -> "31") and the
/// rule would no longer match the value the file shows.
fn opt_scalar<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

/// A boolean as Go's yaml (YAML 1.1) reads one, which envoyproxy/ratelimit
/// uses: `true`/`false`, and also `yes`/`no`, `on`/`off`, `y`/`n` in their
/// lower, capitalised and upper case spellings.
fn yaml11_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct Yaml11Bool;

    impl Visitor<'_> for Yaml11Bool {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a boolean")
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }

        fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
            Ok(false)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            match v {
                "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Ok(true),
                "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Ok(false),
                _ => Err(de::Error::invalid_type(de::Unexpected::Str(v), &self)),
            }
        }
    }

    d.deserialize_any(Yaml11Bool)
}

fn opt_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Parses one file's text. `file` names it in errors.
pub fn parse_str(file: &str, text: &str) -> Result<YamlRoot, RuleErrors> {
    let err = |path: String, message: String| {
        RuleErrors(vec![RuleError {
            file: file.to_owned(),
            path,
            message,
        }])
    };
    if text.trim().is_empty() {
        return Err(err(
            String::new(),
            "config file cannot have empty domain".into(),
        ));
    }
    // serde_yaml_ng reports the path itself: "descriptors[1]: unknown field
    // `bogus`, expected ... at line 6 column 5". Split it off so errors read
    // `FILE: PATH: message` like the semantic ones.
    let text_of_file = text;
    let root = serde_yaml_ng::from_str::<YamlRoot>(text).map_err(|e| {
        let text = e.to_string();
        // A document that is not a mapping at all (a string, a list): say
        // what a rules file is, not the name of the type it did not fit.
        if let Some(found) = text
            .strip_prefix("invalid type: ")
            .and_then(|t| t.split_once(", expected struct YamlRoot"))
            .map(|(found, _)| found)
        {
            return err(
                String::new(),
                format!(
                    "a rules file is a mapping with `domain` and `descriptors`; this one is a {found}"
                ),
            );
        }
        // Most of the reader's errors say where; some (a character that
        // cannot start a token, an unknown anchor, a key that is a list)
        // carry it only beside the message. (A duplicate key's location is
        // its mapping's start, which would mislead: those name the key.)
        let located = text.contains(" at line ") || text.contains(" at position ");
        let text = match e.location() {
            Some(at) if !located && !text.contains("duplicate field") => {
                format!("{text} at line {} column {}", at.line(), at.column())
            }
            _ => text,
        };
        if text.starts_with("deserializing from YAML containing more than one document") {
            return err(
                String::new(),
                "a rules file holds one YAML document (one domain); this one holds \
                 several (a `---` line): give each domain a file of its own"
                    .into(),
            );
        }
        let text = with_line(text, text_of_file);
        match text.split_once(": ") {
            Some((path, message)) if !path.contains(' ') => {
                err(path.to_owned(), message.to_owned())
            }
            _ => err(String::new(), text),
        }
    })?;
    // The structure is right; now the one kind of scalar Go's yaml reads and
    // envoyproxy/ratelimit then refuses ("error checking config"), which a
    // text field here would otherwise take as written.
    let tree: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| err(String::new(), e.to_string()))?;
    let mut refused = Vec::new();
    numbers_go_refuses(&tree, "", &mut refused);
    if refused.is_empty() {
        Ok(root)
    } else {
        Err(RuleErrors(
            refused
                .into_iter()
                .map(|(path, number)| RuleError {
                    file: file.to_owned(),
                    path,
                    message: format!(
                        "the number {number} (a fraction, an exponent, or beyond 64 bits) is \
                         refused here, as envoyproxy/ratelimit refuses it; quote it to mean the text"
                    ),
                })
                .collect(),
        ))
    }
}

/// The YAML reader names a few errors (a control character, say) by their
/// offset in the file (`at position N`), or not at all: they get
/// `at line L column C`, as its other errors read.
fn with_line(message: String, file: &str) -> String {
    let offset = match message.rsplit_once(" at position ") {
        Some((before, offset)) => match offset.trim().parse::<usize>() {
            Ok(offset) => Some((before.to_owned(), offset)),
            Err(_) => None,
        },
        None if message.ends_with("control characters are not allowed") => file
            .chars()
            .position(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
            .map(|offset| (message.clone(), offset)),
        None => None,
    };
    let Some((before, offset)) = offset else {
        return message;
    };
    let mut line = 1;
    let mut column = 1;
    for c in file.chars().take(offset) {
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    format!("{before} at line {line} column {column}")
}

/// Where a plain scalar outside `metadata` is a number Go's yaml reads as a
/// float or an unsigned 64-bit integer: envoyproxy/ratelimit's key check
/// takes strings, ints, booleans and nulls only.
fn numbers_go_refuses(value: &serde_yaml_ng::Value, path: &str, out: &mut Vec<(String, String)>) {
    use serde_yaml_ng::Value;
    match value {
        Value::Mapping(map) => {
            for (key, value) in map {
                let Some(key) = key.as_str() else {
                    continue;
                };
                if key == "metadata" {
                    continue;
                }
                let path = if path.is_empty() {
                    key.to_owned()
                } else {
                    format!("{path}.{key}")
                };
                numbers_go_refuses(value, &path, out);
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                numbers_go_refuses(item, &format!("{path}[{i}]"), out);
            }
        }
        Value::Number(n) if n.as_i64().is_none() => out.push((path.to_owned(), n.to_string())),
        Value::Tagged(tagged) => numbers_go_refuses(&tagged.value, path, out),
        _ => {}
    }
}

/// Checks one parsed file and compiles its tree.
pub fn compile(file: &str, root: &YamlRoot) -> Result<(String, Level), RuleErrors> {
    let mut errors = Vec::new();
    let domain = root.domain.clone().unwrap_or_default();
    if domain.is_empty() {
        errors.push(RuleError {
            file: file.to_owned(),
            path: String::new(),
            message: "config file cannot have empty domain".into(),
        });
    }
    let mut walker = Walker {
        file,
        errors: &mut errors,
    };
    let level = walker.level(&root.descriptors, "", &domain);
    if errors.is_empty() {
        Ok((domain, level))
    } else {
        Err(RuleErrors(errors))
    }
}

struct Walker<'a> {
    file: &'a str,
    errors: &'a mut Vec<RuleError>,
}

impl Walker<'_> {
    fn error(&mut self, path: &str, message: String) {
        self.errors.push(RuleError {
            file: self.file.to_owned(),
            path: path.to_owned(),
            message,
        });
    }

    fn level(&mut self, descriptors: &[YamlDescriptor], parent: &str, rule_path: &str) -> Level {
        let mut level = Level::default();
        // envoyproxy/ratelimit keys a level by `key_value`, so `{key: a,
        // value: b_c}` and `{key: a_b, value: c}` are one entry there and a
        // file with both is refused; sluice matches keys and values apart,
        // but refuses the same files.
        let mut composite = HashSet::new();
        for (i, d) in descriptors.iter().enumerate() {
            let path = if parent.is_empty() {
                format!("descriptors[{i}]")
            } else {
                format!("{parent}.descriptors[{i}]")
            };
            let key = d.key.as_deref().unwrap_or("");
            if key.is_empty() {
                self.error(&path, "descriptor has empty key".into());
                continue;
            }
            let value = d.value.as_deref().filter(|v| !v.is_empty());
            let segment = match value {
                Some(v) => format!("{key}_{v}"),
                None => key.to_owned(),
            };
            let full = format!("{rule_path}.{segment}");
            let matcher = ValueMatch::parse(value);
            let wildcard = matches!(matcher, ValueMatch::Wildcard(_));
            if d.share_threshold && !wildcard {
                self.error(
                    &path,
                    "share_threshold needs a wildcard value (one containing '*')".into(),
                );
            }
            let node = Node {
                rule: self.rule(&path, &full, d),
                children: self.level(&d.descriptors, &path, &full),
                shared_pattern: (d.share_threshold && wildcard)
                    .then(|| Arc::from(value.unwrap_or_default())),
            };
            if !composite.insert(segment) || level.insert(key, matcher, node).is_err() {
                self.error(
                    &path,
                    format!("duplicate descriptor composite key '{full}'"),
                );
            }
        }
        level
    }

    /// The descriptor's rule, from `rate_limit` or `rate_limits`; `None`
    /// when it has neither (a whitelisted value) or on errors.
    fn rule(&mut self, path: &str, full: &str, d: &YamlDescriptor) -> Option<Arc<Rule>> {
        let before = self.errors.len();
        let (limit, name, replaces) = match (&d.rate_limit, &d.rate_limits) {
            (None, None) => return None,
            (Some(_), Some(_)) => {
                self.error(
                    path,
                    "rate_limit and rate_limits are both set: use rate_limit for one limit, \
                     rate_limits for several"
                        .into(),
                );
                return None;
            }
            (Some(rl), None) => {
                let name: Option<Arc<str>> =
                    rl.name.as_deref().filter(|n| !n.is_empty()).map(Arc::from);
                let limit = if rl.unlimited {
                    self.unlimited(path, rl);
                    RuleLimit::Unlimited
                } else {
                    RuleLimit::Limited(vec![self.limit(path, rl, name.clone())])
                };
                (limit, name, self.replaces(path, &rl.replaces))
            }
            (None, Some(list)) => {
                let (limits, replaces) = self.limits(path, list);
                (RuleLimit::Limited(limits), None, replaces)
            }
        };
        let own: Vec<&Arc<str>> = match &limit {
            RuleLimit::Limited(limits) => limits.iter().filter_map(|l| l.name.as_ref()).collect(),
            RuleLimit::Unlimited => name.iter().collect(),
        };
        if replaces.iter().any(|r| own.contains(&r)) {
            self.error(
                path,
                "replaces should not contain name of same descriptor".into(),
            );
        }
        if self.errors.len() > before {
            return None;
        }
        Some(Arc::new(Rule {
            path: full.into(),
            limit,
            name,
            replaces,
            shadow_mode: d.shadow_mode,
            quota_mode: d.quota_mode,
            metadata: d.metadata.clone(),
        }))
    }

    /// Checks that an `unlimited` limit says nothing else about a limit.
    fn unlimited(&mut self, path: &str, rl: &YamlRateLimit) {
        if rl.unit.as_deref().is_some_and(|u| !u.is_empty()) {
            self.error(
                path,
                "should not specify rate limit unit when unlimited".into(),
            );
        }
        if rl.algorithm.is_some() || rl.burst.is_some() {
            self.error(
                path,
                "should not specify algorithm or burst when unlimited".into(),
            );
        }
        if rl.unit_multiplier.is_some() || rl.calendar.is_some() || rl.time_zone.is_some() {
            self.error(
                path,
                "should not specify unit_multiplier, calendar or time_zone when unlimited".into(),
            );
        }
    }

    /// The limits of `rate_limits` (at least one; none unlimited; no two over
    /// one window, which would be one counter) and all their `replaces`.
    fn limits(&mut self, path: &str, list: &[YamlRateLimit]) -> (Vec<Limit>, Vec<Arc<str>>) {
        if list.is_empty() {
            self.error(
                path,
                "rate_limits is empty: give at least one limit (or no rate_limits at all)".into(),
            );
        }
        let mut limits: Vec<Limit> = Vec::with_capacity(list.len());
        let mut replaces = Vec::new();
        for (i, rl) in list.iter().enumerate() {
            let item = format!("{path}.rate_limits[{i}]");
            if rl.unlimited {
                self.error(
                    &item,
                    "a limit in rate_limits cannot be unlimited (use rate_limit: {unlimited: true})"
                        .into(),
                );
                continue;
            }
            let name: Option<Arc<str>> =
                rl.name.as_deref().filter(|n| !n.is_empty()).map(Arc::from);
            if let Some(n) = &name {
                if limits.iter().any(|l| l.name.as_ref() == Some(n)) {
                    self.error(&item, format!("duplicate name '{n}' in rate_limits"));
                }
            }
            let limit = self.limit(&item, rl, name);
            let same_window = limits.iter().position(|l| match (l.window, limit.window) {
                (Window::Calendar(a), Window::Calendar(b)) => a == b,
                (Window::Units { .. }, Window::Units { .. }) => {
                    l.window.seconds() == limit.window.seconds()
                }
                _ => false,
            });
            if let Some(j) = same_window {
                self.error(
                    &item,
                    format!(
                        "the same window as rate_limits[{j}] ({}): a descriptor has one counter \
                         per window, so give each limit its own window",
                        limit.window
                    ),
                );
            }
            replaces.extend(self.replaces(&item, &rl.replaces));
            limits.push(limit);
        }
        (limits, replaces)
    }

    fn replaces(&mut self, path: &str, list: &[YamlReplaces]) -> Vec<Arc<str>> {
        let mut replaces = Vec::with_capacity(list.len());
        for r in list {
            match r.name.as_deref().unwrap_or("") {
                "" => self.error(path, "should not have an empty replaces entry".into()),
                n => replaces.push(Arc::from(n)),
            }
        }
        replaces
    }

    /// One limit (not `unlimited`); errors are recorded, and the limit
    /// returned then is a placeholder the caller drops.
    fn limit(&mut self, path: &str, rl: &YamlRateLimit, name: Option<Arc<str>>) -> Limit {
        let window = match rl.calendar.as_deref().filter(|c| !c.is_empty()) {
            Some(calendar) => self.calendar(path, rl, calendar),
            None => self.units(path, rl),
        };
        let requests_per_unit = match rl.requests_per_unit {
            None => {
                self.error(
                    path,
                    "requests_per_unit is required (without it every request would be blocked)"
                        .into(),
                );
                0
            }
            Some(0) => {
                self.error(
                    path,
                    "requests_per_unit must be at least 1 (0 would block every request)".into(),
                );
                0
            }
            Some(n) => u32::try_from(n).unwrap_or_else(|_| {
                self.error(
                    path,
                    format!("requests_per_unit {n} is larger than {}", u32::MAX),
                );
                0
            }),
        };
        let algorithm = rl.algorithm.as_deref().and_then(|a| {
            let parsed = Algorithm::parse(a);
            if parsed.is_none() {
                self.error(
                    path,
                    format!(
                        "unknown algorithm '{a}' (expected sliding_window, fixed_window or gcra)"
                    ),
                );
            }
            parsed
        });
        let calendar = matches!(window, Window::Calendar(_));
        if calendar && algorithm.is_some_and(|a| a != Algorithm::FixedWindow) {
            self.error(
                path,
                "calendar windows count as fixed windows: algorithm must be fixed_window or left \
                 out"
                .into(),
            );
        }
        let burst = rl.burst.and_then(|b| {
            if algorithm != Some(Algorithm::Gcra) {
                self.error(path, "burst applies only to algorithm gcra".into());
                None
            } else if b == 0 || b > u64::from(u32::MAX) {
                self.error(path, format!("burst must be between 1 and {}", u32::MAX));
                None
            } else {
                Some(b as u32)
            }
        });
        Limit {
            requests_per_unit,
            window,
            algorithm,
            burst,
            name,
        }
    }

    /// `unit` times `unit_multiplier`, at most a year.
    fn units(&mut self, path: &str, rl: &YamlRateLimit) -> Window {
        if rl.time_zone.is_some() {
            self.error(
                path,
                "time_zone applies only to calendar windows (calendar: day, week or month)".into(),
            );
        }
        let unit = match rl.unit.as_deref().filter(|u| !u.is_empty()) {
            Some(raw) => Unit::parse(raw).unwrap_or_else(|| {
                self.error(path, format!("invalid rate limit unit '{raw}'"));
                Unit::Second
            }),
            None => {
                self.error(path, "invalid rate limit unit ''".into());
                Unit::Second
            }
        };
        let multiplier = match rl.unit_multiplier {
            None => 1,
            Some(0) => {
                self.error(path, "unit_multiplier must be at least 1".into());
                1
            }
            Some(m) => match u32::try_from(m) {
                Ok(m) if unit.seconds() * u64::from(m) <= MAX_WINDOW_SECONDS => m,
                _ => {
                    self.error(
                        path,
                        format!(
                            "unit_multiplier {m} makes a window longer than a year \
                             ({MAX_WINDOW_SECONDS} seconds)"
                        ),
                    );
                    1
                }
            },
        };
        Window::Units { unit, multiplier }
    }

    /// A calendar window; it counts as a fixed window.
    fn calendar(&mut self, path: &str, rl: &YamlRateLimit, raw: &str) -> Window {
        if rl.unit.is_some() {
            self.error(
                path,
                "calendar and unit are both set: a calendar window replaces the unit".into(),
            );
        }
        if rl.unit_multiplier.is_some() {
            self.error(
                path,
                "unit_multiplier does not apply to calendar windows".into(),
            );
        }
        let unit = CalendarUnit::parse(raw).unwrap_or_else(|| {
            self.error(
                path,
                format!("invalid calendar '{raw}' (expected day, week or month)"),
            );
            CalendarUnit::Day
        });
        let time_zone = match rl.time_zone.as_deref() {
            None => chrono_tz::UTC,
            Some(zone) => zone.parse().unwrap_or_else(|_| {
                self.error(
                    path,
                    format!(
                        "unknown time_zone '{zone}' (a tz database name such as Europe/Berlin, \
                         or UTC)"
                    ),
                );
                chrono_tz::UTC
            }),
        };
        Window::Calendar(Calendar { unit, time_zone })
    }
}

/// Builds one rule set from several parsed files; a domain may appear once.
pub fn compile_all(files: &[(String, YamlRoot)]) -> Result<RuleSet, RuleErrors> {
    let mut set = RuleSet::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (file, root) in files {
        match compile(file, root) {
            Ok((domain, level)) => {
                if !seen.insert(domain.clone()) || !set.insert_domain(&domain, level) {
                    errors.push(RuleError {
                        file: file.clone(),
                        path: String::new(),
                        message: format!("duplicate domain '{domain}' in config file"),
                    });
                }
            }
            Err(RuleErrors(mut e)) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(RuleErrors(errors))
    }
}

/// The rule files under `path`: the file itself, or the `*.yaml`/`*.yml`
/// files directly in the directory, sorted. Names starting with `.` are
/// skipped, which also skips Kubernetes' `..data` ConfigMap plumbing.
pub fn rule_files(path: &Path) -> Result<Vec<PathBuf>, RuleErrors> {
    let io_err = |p: &Path, e: std::io::Error| {
        RuleErrors(vec![RuleError {
            file: p.display().to_string(),
            path: String::new(),
            message: format!("cannot read: {e}"),
        }])
    };
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| io_err(path, e))? {
        let entry = entry.map_err(|e| io_err(path, e))?;
        let p = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if name.starts_with('.') || !is_yaml || !p.is_file() {
            continue;
        }
        files.push(p);
    }
    files.sort();
    Ok(files)
}

/// Reads, parses and compiles a file or a directory of files, reporting
/// every error of every file.
pub fn load_path(path: &Path) -> Result<RuleSet, RuleErrors> {
    load_files(path).map(|(set, _)| set)
}

/// As [`load_path`], also returning each parsed file (named as in errors),
/// for `sluice rules apply`, which validates exactly as `validate` does.
pub fn load_files(path: &Path) -> Result<(RuleSet, Vec<(String, YamlRoot)>), RuleErrors> {
    let files = rule_files(path)?;
    let mut parsed = Vec::with_capacity(files.len());
    let mut errors = Vec::new();
    for file in &files {
        let name = display_name(path, file);
        match std::fs::read_to_string(file) {
            Ok(text) => match parse_str(&name, &text) {
                Ok(root) => parsed.push((name, root)),
                Err(RuleErrors(mut e)) => errors.append(&mut e),
            },
            Err(e) => errors.push(RuleError {
                file: name,
                path: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    match compile_all(&parsed) {
        Ok(set) if errors.is_empty() => Ok((set, parsed)),
        Ok(_) => Err(RuleErrors(errors)),
        Err(RuleErrors(mut e)) => {
            errors.append(&mut e);
            Err(RuleErrors(errors))
        }
    }
}

/// Files in a directory are named relative to it (`weather.yaml`); a single
/// file keeps the path it was given.
fn display_name(root: &Path, file: &Path) -> String {
    file.strip_prefix(root)
        .ok()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(file)
        .display()
        .to_string()
}

#[cfg(test)]
mod extension_tests;
#[cfg(test)]
mod tests;
