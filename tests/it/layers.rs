//! The layering table in `src/lib.rs` holds: every `crate::` path in `src/`
//! points to a module in a lower layer. Test code (`tests.rs`, `*_tests.rs`
//! and `#[cfg(test)]` modules) may reach up, as the table says.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `module -> layer`, from the `| N | `a`, `b` |` rows of lib.rs's table.
fn layers(lib_rs: &str) -> BTreeMap<String, u32> {
    let mut layers = BTreeMap::new();
    for line in lib_rs.lines() {
        let Some(row) = line.strip_prefix("//! |") else {
            continue;
        };
        let mut cells = row.split('|');
        let (Some(layer), Some(modules)) = (cells.next(), cells.next()) else {
            continue;
        };
        let Ok(layer) = layer.trim().parse::<u32>() else {
            continue;
        };
        for module in modules.split(',') {
            let name = module.trim().trim_matches('`');
            assert!(
                layers.insert(name.to_owned(), layer).is_none(),
                "lib.rs: `{name}` is in the layer table twice"
            );
        }
    }
    layers
}

/// The source without comments, string and char literals, and `#[cfg(test)]`
/// items, so that only code paths remain.
fn code_only(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &source[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |end| end + 2);
        } else if let Some(hashes) = raw_string_start(source, i) {
            let open = 2 + hashes;
            let close = format!("\"{}", "#".repeat(hashes));
            i += open + rest[open..].find(&close).expect("unterminated raw string") + close.len();
            out.push_str("\"\"");
        } else if rest.starts_with('"') {
            let mut j = 1;
            while rest.as_bytes()[j] != b'"' {
                j += if rest.as_bytes()[j] == b'\\' { 2 } else { 1 };
            }
            i += j + 1;
            out.push_str("\"\"");
        } else if rest.starts_with("#[cfg(test)]") {
            i += skip_item(rest);
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `r"`, `r#"`, ... at `i`, not inside an identifier: the number of `#`.
fn raw_string_start(source: &str, i: usize) -> Option<usize> {
    let rest = &source[i..];
    let after_r = rest.strip_prefix('r')?;
    let hashes = after_r.len() - after_r.trim_start_matches('#').len();
    let preceded_by_ident = source[..i]
        .chars()
        .next_back()
        .is_some_and(|c| c.is_alphanumeric() || c == '_');
    (after_r[hashes..].starts_with('"') && !preceded_by_ident).then_some(hashes)
}

/// The length of the attribute and the item after it: up to the `;` or the
/// `}` that closes its first brace.
fn skip_item(item: &str) -> usize {
    let mut depth = 0;
    for (i, c) in item.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            ';' if depth == 0 => return i + 1,
            _ => {}
        }
    }
    item.len()
}

/// The top-level modules named by each `crate::` path, including each
/// branch of `crate::{a::x, b}`.
fn crate_imports(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut branch_start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        found.insert(ident(&group[branch_start..i]));
                        branch_start = i + 1;
                    }
                    _ => {}
                }
                if depth == 0 {
                    found.insert(ident(&group[branch_start..i]));
                    break;
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_import_points_to_a_lower_layer() {
    let src = src_dir();
    let lib_rs = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let layers = layers(&lib_rs);

    let declared: BTreeSet<String> = lib_rs
        .lines()
        .filter_map(|l| {
            let l = l.trim_start_matches("pub ");
            l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned)
        })
        .collect();
    let tabled: BTreeSet<String> = layers.keys().cloned().collect();
    assert_eq!(
        declared, tabled,
        "lib.rs: the layer table must name every module, once"
    );

    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative
            .iter()
            .next()
            .and_then(|c| c.to_str())
            .expect("utf-8 path");
        let module = first.trim_end_matches(".rs");
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if matches!(module, "lib" | "main" | "bin")
            || name == "tests.rs"
            || name.ends_with("_tests.rs")
        {
            continue;
        }
        let layer = layers[module];
        let code = code_only(&std::fs::read_to_string(&file).expect("read source"));
        for import in crate_imports(&code) {
            checked += 1;
            if import == module {
                continue;
            }
            match layers.get(&import) {
                Some(&to) if to < layer => {}
                Some(&to) => violations.push(format!(
                    "{}: `{module}` (layer {layer}) imports `{import}` (layer {to})",
                    relative.display()
                )),
                None => violations.push(format!(
                    "{}: `crate::{import}` is not a module in the layer table",
                    relative.display()
                )),
            }
        }
    }
    assert!(
        checked > 50,
        "read only {checked} imports: is the parser broken?"
    );
    assert!(
        violations.is_empty(),
        "imports against the layers:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_imports_and_skips_comments_strings_and_tests() {
    let code = code_only(
        r##"
use crate::{limiter::{Code, Unit}, rules};
// use crate::app;
let url = "crate::config";
let raw = r#"crate::http"#;
/* crate::grpc */
let x = crate::storage::memory::MemoryStore::new();
#[cfg(test)]
mod tests { use crate::service; }
"##,
    );
    let found: Vec<String> = crate_imports(&code).into_iter().collect();
    assert_eq!(found, ["limiter", "rules", "storage"]);
}
