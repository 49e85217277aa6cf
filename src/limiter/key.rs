//! Counter keys. A key is a keyed BLAKE3 hash of the domain and the
//! descriptor's entries, so no raw client identifier (IP, API key, device id)
//! ever reaches a store, a log line or a metric.

use std::fmt;

use super::{Algorithm, Calendar, Entry};

/// Derives counter keys from descriptor values with a secret key.
/// Instances that share counters must share the secret.
#[derive(Clone)]
pub struct KeyHasher {
    key: [u8; 32],
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHasher(<redacted>)")
    }
}

const CONTEXT: &str = "sluice 2026-11 counter keys v1";

impl KeyHasher {
    /// Derives the hashing key from an operator-supplied secret of any length.
    pub fn from_secret(secret: &[u8]) -> KeyHasher {
        KeyHasher {
            key: blake3::derive_key(CONTEXT, secret),
        }
    }

    /// A random key: fine for the in-process store, whose counters die with
    /// the process anyway.
    pub fn random() -> KeyHasher {
        let mut key = [0u8; 32];
        // The OS RNG failing is not something sluice can recover from.
        getrandom::fill(&mut key).unwrap_or_else(|e| panic!("OS random source failed: {e}"));
        KeyHasher { key }
    }

    /// The key of one counter. `shared[i]`, when set, replaces the value of
    /// entry `i` (a `share_threshold` wildcard: all matching values share one
    /// counter, keyed by the pattern).
    pub fn counter_key(
        &self,
        domain: &str,
        entries: &[Entry<'_>],
        shared: &[Option<&str>],
        algorithm: Algorithm,
        period_s: u64,
    ) -> CounterKey {
        CounterKey {
            hash: self.descriptor_hash(domain, entries, shared, None),
            algorithm,
            period_s,
        }
    }

    /// The key of a descriptor's counter over a calendar window: its own
    /// counter, apart from every epoch-aligned one and from the same
    /// calendar unit in another time zone. The calendar is hashed in as one
    /// more field after the entries' pairs, so no descriptor's fields can
    /// spell it. `period_s` is the unit's nominal length.
    pub fn calendar_key(
        &self,
        domain: &str,
        entries: &[Entry<'_>],
        shared: &[Option<&str>],
        calendar: Calendar,
    ) -> CounterKey {
        let field = format!("calendar:{}:{}", calendar.unit, calendar.time_zone.name());
        CounterKey {
            hash: self.descriptor_hash(domain, entries, shared, Some(field.as_bytes())),
            algorithm: Algorithm::FixedWindow,
            period_s: calendar.unit.nominal().seconds(),
        }
    }

    /// The domain, the entries (with shared values), and `extra` if any,
    /// as length-prefixed fields.
    fn descriptor_hash(
        &self,
        domain: &str,
        entries: &[Entry<'_>],
        shared: &[Option<&str>],
        extra: Option<&[u8]>,
    ) -> [u8; 16] {
        // The same length-prefixed fields as the streaming hasher below,
        // gathered on the stack and hashed in one call when they fit: for
        // keys this short, the hasher's per-update work was most of the cost.
        let mut fields = InlineFields::new();
        let mut fits = fields.push(domain.as_bytes());
        for (i, e) in entries.iter().enumerate() {
            fits = fits
                && fields.push(e.key.as_bytes())
                && fields.push(field_value(shared, i, e).as_bytes());
        }
        if let Some(extra) = extra {
            fits = fits && fields.push(extra);
        }
        let digest = if fits {
            blake3::keyed_hash(&self.key, fields.bytes())
        } else {
            let mut h = blake3::Hasher::new_keyed(&self.key);
            write_field(&mut h, domain.as_bytes());
            for (i, e) in entries.iter().enumerate() {
                write_field(&mut h, e.key.as_bytes());
                write_field(&mut h, field_value(shared, i, e).as_bytes());
            }
            if let Some(extra) = extra {
                write_field(&mut h, extra);
            }
            h.finalize()
        };
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&digest.as_bytes()[..16]);
        hash
    }

    /// The counter of a tenant's monthly quota, shared by all its keys and
    /// domains. Its own namespace: request domains are never empty.
    pub fn quota_key(&self, tenant_id: &str, period_s: u64) -> CounterKey {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        write_field(&mut h, b"");
        write_field(&mut h, b"tenant-quota");
        write_field(&mut h, tenant_id.as_bytes());
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&h.finalize().as_bytes()[..16]);
        CounterKey {
            hash,
            algorithm: Algorithm::FixedWindow,
            period_s,
        }
    }

    /// A short keyed hash of a client identifier, for log lines and usage
    /// records that must name a client without revealing it.
    pub fn client_id(&self, value: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        write_field(&mut h, b"client");
        write_field(&mut h, value.as_bytes());
        hex::encode(&h.finalize().as_bytes()[..8])
    }

    /// Hash of an API key, as stored in PostgreSQL.
    pub fn api_key(&self, raw_key: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        write_field(&mut h, b"api-key");
        write_field(&mut h, raw_key.as_bytes());
        hex::encode(h.finalize().as_bytes())
    }

    /// Hash of an admin API token, as stored in PostgreSQL: keyed as API
    /// keys are, in a field of its own so a key never passes for a token.
    pub fn admin_token(&self, raw_token: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        write_field(&mut h, b"admin-token");
        write_field(&mut h, raw_token.as_bytes());
        hex::encode(h.finalize().as_bytes())
    }
}

/// Entry `i`'s value, or the shared pattern that replaces it.
fn field_value<'v>(shared: &[Option<&'v str>], i: usize, e: &Entry<'v>) -> &'v str {
    shared.get(i).copied().flatten().unwrap_or(e.value)
}

/// Length-prefixed, so ("ab","c") and ("a","bc") hash differently.
fn write_field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u32).to_le_bytes());
    h.update(bytes);
}

/// [`write_field`]'s encoding into a stack buffer, for one-call hashing.
struct InlineFields {
    buf: [u8; InlineFields::CAPACITY],
    len: usize,
}

impl InlineFields {
    /// Room for a domain and a few entries of typical length; longer keys
    /// take the streaming path.
    const CAPACITY: usize = 256;

    fn new() -> InlineFields {
        InlineFields {
            buf: [0; InlineFields::CAPACITY],
            len: 0,
        }
    }

    /// Appends one field; `false` (and nothing written) when it does not fit.
    fn push(&mut self, bytes: &[u8]) -> bool {
        let end = self.len + 4 + bytes.len();
        let Some(out) = self.buf.get_mut(self.len..end) else {
            return false;
        };
        out[..4].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        out[4..].copy_from_slice(bytes);
        self.len = end;
        true
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Identifies one counter: hashed descriptor, algorithm and period. Small and
/// `Copy`, so the in-process store uses it as its map key directly.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub hash: [u8; 16],
    pub algorithm: Algorithm,
    pub period_s: u64,
}

impl CounterKey {
    /// Appends the Redis key, `sluice:{<hash>}:<algorithm>:<period>`, to
    /// `buf`. The braces are a Cluster hash tag: one counter, one slot.
    pub fn write_redis_key(&self, prefix: &str, buf: &mut String) {
        buf.push_str(prefix);
        buf.push('{');
        // By table and itoa: `write!` goes through the formatter, which
        // cost a Redis decision some 3 900 instructions for the hex alone.
        let tag = self.hash_hex();
        buf.push_str(std::str::from_utf8(&tag).unwrap_or_default());
        buf.push_str("}:");
        buf.push_str(match self.algorithm {
            Algorithm::SlidingWindow => "sw",
            Algorithm::FixedWindow => "fw",
            Algorithm::Gcra => "gcra",
        });
        buf.push(':');
        buf.push_str(itoa::Buffer::new().format(self.period_s));
    }

    /// The hash in hex: the Redis key's hash tag.
    pub fn hash_hex(&self) -> [u8; 32] {
        let mut tag = [0u8; 32];
        // Infallible: 32 digits for 16 bytes.
        let _ = hex::encode_to_slice(self.hash, &mut tag);
        tag
    }

    pub fn redis_key(&self, prefix: &str) -> String {
        let mut s = String::with_capacity(prefix.len() + 48);
        self.write_redis_key(prefix, &mut s);
        s
    }
}

impl fmt::Debug for CounterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redis_key(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Entry<'a>> {
        pairs
            .iter()
            .map(|&(key, value)| Entry { key, value })
            .collect()
    }

    #[test]
    fn hex_by_table_is_the_formatter_s_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        let formatted: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex::encode(&bytes), formatted);
        let key = CounterKey {
            hash: std::array::from_fn(|i| (i * 17) as u8),
            algorithm: Algorithm::Gcra,
            period_s: 60,
        };
        let tag: String = key.hash.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(key.hash_hex().as_slice(), tag.as_bytes());
        assert_eq!(key.redis_key("p:"), format!("p:{{{tag}}}:gcra:60"));
    }

    #[test]
    fn keys_never_contain_raw_values() {
        let h = KeyHasher::from_secret(b"s3cret");
        let e = entries(&[("remote_address", "203.0.113.7")]);
        let key = h
            .counter_key("weather", &e, &[], Algorithm::FixedWindow, 60)
            .redis_key("sluice:");
        assert!(!key.contains("203.0.113.7"), "{key}");
        assert!(
            key.starts_with("sluice:{") && key.ends_with("}:fw:60"),
            "{key}"
        );
    }

    #[test]
    fn keys_depend_on_secret_values_and_boundaries() {
        let a = KeyHasher::from_secret(b"one");
        let b = KeyHasher::from_secret(b"two");
        let e = entries(&[("k", "v")]);
        let ka = a.counter_key("d", &e, &[], Algorithm::Gcra, 1);
        assert_eq!(ka, a.counter_key("d", &e, &[], Algorithm::Gcra, 1));
        assert_ne!(ka, b.counter_key("d", &e, &[], Algorithm::Gcra, 1));
        let split1 = entries(&[("ab", "c")]);
        let split2 = entries(&[("a", "bc")]);
        assert_ne!(
            a.counter_key("d", &split1, &[], Algorithm::Gcra, 1),
            a.counter_key("d", &split2, &[], Algorithm::Gcra, 1)
        );
    }

    #[test]
    fn shared_values_collapse_to_one_counter() {
        let h = KeyHasher::from_secret(b"x");
        let shared = [Some("api/*")];
        let k1 = h.counter_key(
            "d",
            &entries(&[("path", "api/a")]),
            &shared,
            Algorithm::Gcra,
            1,
        );
        let k2 = h.counter_key(
            "d",
            &entries(&[("path", "api/b")]),
            &shared,
            Algorithm::Gcra,
            1,
        );
        assert_eq!(k1, k2);
    }

    #[test]
    fn long_keys_hash_as_short_ones_do() {
        // Keys past the inline buffer take the streaming path; both must
        // hash the same length-prefixed fields.
        let h = KeyHasher::from_secret(b"x");
        let streamed = |domain: &str, entries: &[Entry<'_>]| {
            let mut s = blake3::Hasher::new_keyed(&h.key);
            write_field(&mut s, domain.as_bytes());
            for e in entries {
                write_field(&mut s, e.key.as_bytes());
                write_field(&mut s, e.value.as_bytes());
            }
            s.finalize().as_bytes()[..16].to_vec()
        };
        let long = "v".repeat(InlineFields::CAPACITY);
        for value in ["short", &long[..200], &long[..], ""] {
            let e = entries(&[("k", value), ("k2", "w")]);
            let key = h.counter_key("d", &e, &[], Algorithm::Gcra, 1);
            assert_eq!(
                key.hash.to_vec(),
                streamed("d", &e),
                "value of {} bytes",
                value.len()
            );
        }
    }

    #[test]
    fn a_calendar_window_has_a_counter_of_its_own() {
        use crate::limiter::CalendarUnit;
        let h = KeyHasher::from_secret(b"x");
        let e = entries(&[("tenant", "acme")]);
        let month = |zone: &str| Calendar {
            unit: CalendarUnit::Month,
            time_zone: zone.parse().unwrap(),
        };
        let berlin = h.calendar_key("d", &e, &[], month("Europe/Berlin"));
        assert_eq!(berlin, h.calendar_key("d", &e, &[], month("Europe/Berlin")));
        assert_ne!(berlin, h.calendar_key("d", &e, &[], month("UTC")));
        let epoch_month = h.counter_key("d", &e, &[], Algorithm::FixedWindow, 30 * 86_400);
        assert_eq!(berlin.period_s, epoch_month.period_s);
        assert_ne!(berlin, epoch_month);
        // The calendar field after the pairs: no descriptor spells it.
        let spelled = entries(&[("tenant", "acme"), ("calendar:month:UTC", "")]);
        assert_ne!(
            h.calendar_key("d", &e, &[], month("UTC")).hash,
            h.counter_key("d", &spelled, &[], Algorithm::FixedWindow, 1)
                .hash
        );
    }

    #[test]
    fn debug_output_is_redacted() {
        let h = KeyHasher::from_secret(b"topsecret");
        assert_eq!(format!("{h:?}"), "KeyHasher(<redacted>)");
    }
}
