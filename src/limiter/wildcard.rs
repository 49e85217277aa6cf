//! Wildcard values: `*` anywhere in a configured value, any number of times,
//! as envoyproxy/ratelimit matches them: the pattern is split on `*` and its
//! literal parts must appear in the value in order, the first at the start
//! and the last at the end (`*` matches any run of bytes, the empty one too).
//!
//! A level keeps its patterns in a [`PatternSet`], where the first pattern in
//! file order that matches wins. Trying every pattern in turn, as
//! envoyproxy/ratelimit does, costs a lookup the number of patterns; instead
//! a byte trie of the patterns' literal prefixes (the text before the first
//! `*`) yields only the patterns whose prefix the value starts with, so a
//! lookup costs the value's length plus the few candidates it reaches. A
//! level with only a few patterns tries them in turn, which is faster still.

use std::fmt;

/// One configured wildcard value: text with at least one `*`.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    text: Box<str>,
    /// `text` split on `*`: at least two parts, any of them empty.
    parts: Box<[Box<str>]>,
}

impl Pattern {
    /// `None` when `text` has no `*` (an exact value).
    pub fn new(text: &str) -> Option<Pattern> {
        if !text.contains('*') {
            return None;
        }
        Some(Pattern {
            text: text.into(),
            parts: text.split('*').map(Box::from).collect(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The literal text before the first `*`.
    fn prefix(&self) -> &str {
        self.parts.first().map_or("", |p| p)
    }

    pub fn matches(&self, value: &str) -> bool {
        let Some((first, rest)) = self.parts.split_first() else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return false;
        };
        // The last part is taken from what the first leaves, so the two never
        // overlap: `ab*ba` does not match `aba`. Empty parts are skipped
        // rather than compared: comparing with an empty boxed string (whose
        // pointer dangles) measured 50 times slower than a short compare.
        let mut rest = value;
        if !first.is_empty() {
            match rest.strip_prefix(&**first) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        if !last.is_empty() {
            match rest.strip_suffix(&**last) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        // Leftmost first is enough: a later occurrence of a part only leaves
        // less room for the parts after it.
        for part in middle.iter().filter(|p| !p.is_empty()) {
            match rest.find(&**part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

/// Up to this many patterns, [`PatternSet::find`] tries each in turn.
const LINEAR_MAX: usize = 8;

/// Patterns in file order, each with its payload; see the module docs.
#[derive(Clone, Debug)]
pub struct PatternSet<T> {
    entries: Vec<(Pattern, T)>,
    /// Node 0 is the root (the empty prefix).
    trie: Vec<TrieNode>,
}

#[derive(Clone, Debug, Default)]
struct TrieNode {
    /// By byte, sorted.
    children: Vec<(u8, u32)>,
    /// Indices into `entries` of the patterns whose prefix ends here, in
    /// ascending (file) order.
    patterns: Vec<u32>,
}

impl<T> Default for PatternSet<T> {
    fn default() -> Self {
        PatternSet {
            entries: Vec::new(),
            trie: vec![TrieNode::default()],
        }
    }
}

impl<T> PatternSet<T> {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Appends a pattern; hands `value` back if the same pattern is here.
    pub fn insert(&mut self, pattern: Pattern, value: T) -> Result<(), T> {
        if self.entries.iter().any(|(p, _)| p.text == pattern.text) {
            return Err(value);
        }
        let Ok(index) = u32::try_from(self.entries.len()) else {
            return Err(value);
        };
        let mut node = 0;
        for &byte in pattern.prefix().as_bytes() {
            let children = &self.trie[node].children;
            node = match children.binary_search_by_key(&byte, |&(b, _)| b) {
                Ok(at) => children[at].1 as usize,
                Err(at) => {
                    let child = self.trie.len();
                    self.trie.push(TrieNode::default());
                    // At most one node per byte of the patterns' prefixes.
                    let id = u32::try_from(child).unwrap_or(u32::MAX);
                    self.trie[node].children.insert(at, (byte, id));
                    child
                }
            };
        }
        self.trie[node].patterns.push(index);
        self.entries.push((pattern, value));
        Ok(())
    }

    /// The first pattern in file order that matches `value`.
    pub fn find(&self, value: &str) -> Option<(&Pattern, &T)> {
        // A few patterns are tried faster in turn than through the trie,
        // whose walk costs a step per byte of the longest prefix matched.
        if self.entries.len() <= LINEAR_MAX {
            return self
                .entries
                .iter()
                .find(|(p, _)| p.matches(value))
                .map(|(p, v)| (p, v));
        }
        let bytes = value.as_bytes();
        let mut best: Option<u32> = None;
        let mut node = 0;
        let mut depth = 0;
        loop {
            let here = &self.trie[node];
            for &i in &here.patterns {
                if best.is_some_and(|b| i >= b) {
                    break;
                }
                if self.entries[i as usize].0.matches(value) {
                    best = Some(i);
                    break;
                }
            }
            let Some(&byte) = bytes.get(depth) else {
                break;
            };
            match here.children.binary_search_by_key(&byte, |&(b, _)| b) {
                Ok(at) => node = here.children[at].1 as usize,
                Err(_) => break,
            }
            depth += 1;
        }
        best.map(|i| {
            let (p, v) = &self.entries[i as usize];
            (p, v)
        })
    }

    /// In file order.
    pub fn iter(&self) -> impl Iterator<Item = (&Pattern, &T)> {
        self.entries.iter().map(|(p, v)| (p, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A glob matcher written the obvious way: `*` tries every split.
    fn reference(pattern: &[u8], value: &[u8]) -> bool {
        match pattern.split_first() {
            None => value.is_empty(),
            Some((b'*', rest)) => (0..=value.len()).any(|at| reference(rest, &value[at..])),
            Some((c, rest)) => value.first() == Some(c) && reference(rest, &value[1..]),
        }
    }

    fn pattern(text: &str) -> Pattern {
        Pattern::new(text).unwrap_or_else(|| panic!("{text} has no '*'"))
    }

    #[test]
    fn star_anywhere_any_number_of_times() {
        let cases = [
            ("foo*", "foo", true),
            ("foo*", "foobar", true),
            ("foo*", "fo", false),
            ("*bar", "bar", true),
            ("*bar", "foobar", true),
            ("*bar", "barx", false),
            ("bar*b", "barb", true),
            ("bar*b", "barxyzb", true),
            ("bar*b", "bar", false),
            ("ab*ba", "aba", false),
            ("ab*ba", "abba", true),
            ("foo*bar*baz", "foobarbaz", true),
            ("foo*bar*baz", "foo-bar-baz", true),
            ("foo*bar*baz", "foo-baz-bar", false),
            ("a*a*a", "aa", false),
            ("a*a*a", "aaa", true),
            ("*", "", true),
            ("**", "x", true),
            ("x*y*z", "xyz", true),
            ("x*y*z", "xzy", false),
            ("é*ü", "éaü", true),
        ];
        for (p, v, expected) in cases {
            assert_eq!(pattern(p).matches(v), expected, "{p} vs {v}");
            assert_eq!(
                reference(p.as_bytes(), v.as_bytes()),
                expected,
                "{p} vs {v}"
            );
        }
        assert!(Pattern::new("exact").is_none());
    }

    #[test]
    fn first_in_file_order_wins_and_duplicates_are_refused() {
        let mut set = PatternSet::default();
        set.insert(pattern("a*z"), 1).unwrap();
        set.insert(pattern("*"), 2).unwrap();
        set.insert(pattern("ab*"), 3).unwrap();
        assert_eq!(set.insert(pattern("ab*"), 4), Err(4));
        assert_eq!(set.find("abz").map(|(_, v)| *v), Some(1));
        assert_eq!(set.find("abc").map(|(_, v)| *v), Some(2));
        assert_eq!(set.find("").map(|(p, _)| p.as_str()), Some("*"));
        assert_eq!(set.len(), 3);
        let empty = PatternSet::<u8>::default();
        assert!(empty.is_empty() && empty.find("x").is_none());
    }

    /// Short strings over a few letters, so parts collide often, and a
    /// two-byte character to keep the byte offsets honest.
    fn text(max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!['a', 'b', 'é']), 0..max)
            .prop_map(|cs| cs.into_iter().collect())
    }

    fn pattern_text() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!['a', 'b', 'é', '*', '*']), 0..8).prop_map(
            |cs| {
                let mut s: String = cs.into_iter().collect();
                if !s.contains('*') {
                    s.push('*');
                }
                s
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn a_pattern_matches_as_the_reference_does(p in pattern_text(), v in text(10)) {
            prop_assert_eq!(
                pattern(&p).matches(&v),
                reference(p.as_bytes(), v.as_bytes()),
                "{:?} vs {:?}", p, v
            );
        }

        #[test]
        fn a_set_finds_the_first_matching_pattern_in_file_order(
            patterns in prop::collection::vec(pattern_text(), 0..24),
            values in prop::collection::vec(text(10), 1..16),
        ) {
            let mut set = PatternSet::default();
            let mut kept: Vec<&str> = Vec::new();
            for (i, p) in patterns.iter().enumerate() {
                let fresh = !kept.contains(&p.as_str());
                prop_assert_eq!(set.insert(pattern(p), i).is_ok(), fresh);
                if fresh {
                    kept.push(p);
                }
            }
            for v in &values {
                let expected = kept.iter().find(|p| reference(p.as_bytes(), v.as_bytes()));
                prop_assert_eq!(set.find(v).map(|(p, _)| p.as_str()), expected.copied(), "{:?}", v);
            }
        }
    }
}
