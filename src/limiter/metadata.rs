//! A rule's `metadata`: free-form values (strings, numbers, booleans, null,
//! lists, maps) from the rules, returned to the caller as Envoy dynamic
//! metadata, a protobuf `Struct`. Numbers are `f64`, as `Struct` holds them.
//!
//! It reads from YAML (the rules file) and JSON (PostgreSQL, the rules
//! snapshot) through serde, and writes back the same way.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The top level of a rule's metadata: a map, as `Struct` is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata(pub BTreeMap<String, MetaValue>);

#[derive(Clone, Debug)]
pub enum MetaValue {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    List(Vec<MetaValue>),
    Map(Metadata),
}

impl PartialEq for MetaValue {
    fn eq(&self, other: &MetaValue) -> bool {
        use MetaValue::*;
        match (self, other) {
            (Null, Null) => true,
            (Bool(a), Bool(b)) => a == b,
            // By bits, so that a rule with a NaN equals itself.
            (Number(a), Number(b)) => a.to_bits() == b.to_bits(),
            (String(a), String(b)) => a == b,
            (List(a), List(b)) => a == b,
            (Map(a), Map(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for MetaValue {}

impl Metadata {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Merges `other` in as envoyproxy/ratelimit merges the metadata of a
    /// request's descriptors: a key already here keeps its value (the first
    /// descriptor wins), unless both values are maps, which merge the same
    /// way, key by key; a new key is added.
    pub fn merge(&mut self, other: &Metadata) {
        for (key, value) in &other.0 {
            match (self.0.get_mut(key), value) {
                (None, _) => {
                    self.0.insert(key.clone(), value.clone());
                }
                (Some(MetaValue::Map(mine)), MetaValue::Map(theirs)) => mine.merge(theirs),
                (Some(_), _) => {}
            }
        }
    }
}

// === serde ===

impl Serialize for Metadata {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl Serialize for MetaValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MetaValue::Null => s.serialize_unit(),
            MetaValue::Bool(b) => s.serialize_bool(*b),
            // Whole numbers as integers, so `5` reads back as written.
            MetaValue::Number(n) if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 => {
                s.serialize_i64(*n as i64)
            }
            MetaValue::Number(n) => s.serialize_f64(*n),
            MetaValue::String(v) => s.serialize_str(v),
            MetaValue::List(l) => l.serialize(s),
            MetaValue::Map(m) => m.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Metadata {
    /// Keys at the top level are read as text (`200: x` is the key "200",
    /// as Go's yaml reads a map into string keys); a key given twice is an
    /// error, where serde would keep the last one silently.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Metadata, D::Error> {
        struct Top;

        impl<'de> Visitor<'de> for Top {
            type Value = Metadata;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_unit<E: de::Error>(self) -> Result<Metadata, E> {
                Ok(Metadata::default())
            }

            fn visit_none<E: de::Error>(self) -> Result<Metadata, E> {
                Ok(Metadata::default())
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Metadata, A::Error> {
                collect_map::<String, A>(map)
            }
        }

        d.deserialize_map(Top)
    }
}

impl<'de> Deserialize<'de> for MetaValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MetaValue, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

fn collect_map<'de, K, A>(mut map: A) -> Result<Metadata, A::Error>
where
    K: Deserialize<'de> + Into<String>,
    A: MapAccess<'de>,
{
    let mut out = BTreeMap::new();
    while let Some(key) = map.next_key::<K>()? {
        let key: String = key.into();
        if out.contains_key(&key) {
            return Err(de::Error::custom(format!(
                "duplicate entry with key \"{key}\""
            )));
        }
        let value = map.next_value::<MetaValue>()?;
        out.insert(key, value);
    }
    Ok(Metadata(out))
}

/// A key inside a nested map: any scalar, written as text the way Go's
/// `fmt` writes the value envoyproxy/ratelimit's YAML library read (`yes`
/// stays "yes" here, see docs/compatibility.md).
struct NestedKey(String);

impl From<NestedKey> for String {
    fn from(k: NestedKey) -> String {
        k.0
    }
}

impl<'de> Deserialize<'de> for NestedKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<NestedKey, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = NestedKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar key")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<NestedKey, E> {
                Ok(NestedKey(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NestedKey, E> {
                Ok(NestedKey(v.to_string()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NestedKey, E> {
                Ok(NestedKey(v.to_string()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<NestedKey, E> {
                Ok(NestedKey(v.to_string()))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<NestedKey, E> {
                Ok(NestedKey(v.to_owned()))
            }

            fn visit_unit<E: de::Error>(self) -> Result<NestedKey, E> {
                Ok(NestedKey("<nil>".to_owned()))
            }
        }

        d.deserialize_any(KeyVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = MetaValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, number, boolean, null, list or mapping")
    }

    fn visit_unit<E: de::Error>(self) -> Result<MetaValue, E> {
        Ok(MetaValue::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<MetaValue, E> {
        Ok(MetaValue::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<MetaValue, D::Error> {
        MetaValue::deserialize(d)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<MetaValue, E> {
        Ok(MetaValue::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<MetaValue, E> {
        Ok(MetaValue::Number(v as f64))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<MetaValue, E> {
        Ok(MetaValue::Number(v as f64))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<MetaValue, E> {
        Ok(MetaValue::Number(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<MetaValue, E> {
        Ok(MetaValue::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<MetaValue, E> {
        Ok(MetaValue::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MetaValue, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(MetaValue::List(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MetaValue, A::Error> {
        collect_map::<NestedKey, A>(map).map(MetaValue::Map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Metadata {
        serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    #[test]
    fn any_yaml_reads_and_writes_back() {
        let m = yaml(
            "name: svc\ncount: 3\nratio: 1.5\non: true\nnothing: ~\n200: x\n\
             tags: [a, 1, false]\nowner: {team: payments, ids: [1, 2], 7: seven}\n",
        );
        assert_eq!(m.0["name"], MetaValue::String("svc".into()));
        assert_eq!(m.0["count"], MetaValue::Number(3.0));
        assert_eq!(m.0["ratio"], MetaValue::Number(1.5));
        assert_eq!(m.0["on"], MetaValue::Bool(true));
        assert_eq!(m.0["nothing"], MetaValue::Null);
        assert_eq!(m.0["200"], MetaValue::String("x".into()));
        assert_eq!(
            m.0["tags"],
            MetaValue::List(vec![
                MetaValue::String("a".into()),
                MetaValue::Number(1.0),
                MetaValue::Bool(false),
            ])
        );
        let MetaValue::Map(owner) = &m.0["owner"] else {
            panic!("owner is a map: {m:?}");
        };
        assert_eq!(owner.0["7"], MetaValue::String("seven".into()));
        let json = serde_json::to_string(&m).expect("serializes");
        assert_eq!(serde_json::from_str::<Metadata>(&json).expect("reads"), m);
        assert!(json.contains("\"count\":3,"), "{json}");
        let text = serde_yaml_ng::to_string(&m).expect("serializes");
        assert_eq!(yaml(&text), m, "{text}");
    }

    #[test]
    fn duplicate_keys_are_refused_at_every_depth() {
        for text in ["a: 1\na: 2\n", "a: {b: 1, b: 2}\n"] {
            let err = serde_yaml_ng::from_str::<Metadata>(text).expect_err(text);
            assert!(err.to_string().contains("duplicate entry"), "{err}");
        }
    }

    #[test]
    fn merge_keeps_the_first_value_and_merges_maps() {
        let mut m = yaml("name: one\nowner: {team: a}\nlist: [1]\n");
        m.merge(&yaml(
            "name: two\nowner: {team: b, tier: 2}\nlist: [2]\nextra: x\n",
        ));
        assert_eq!(
            m,
            yaml("name: one\nowner: {team: a, tier: 2}\nlist: [1]\nextra: x\n")
        );
    }
}
