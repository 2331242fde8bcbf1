//! BENCHMARKS.md is written by several commands (`cargo xtask bench`, `cargo xtask soak`): each
//! owns a section between `<!-- name:begin -->` and `<!-- name:end -->` markers and replaces only
//! its own, keeping the others as they are.

use std::path::Path;

use anyhow::{Context as _, Result};

fn markers(name: &str) -> (String, String) {
    (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    )
}

/// The section `name` of `md`, markers included, if present.
pub fn section<'a>(md: &'a str, name: &str) -> Option<&'a str> {
    let (begin, end) = markers(name);
    let a = md.find(&begin)?;
    let b = md[a..].find(&end)? + a + end.len();
    Some(&md[a..b])
}

/// `md` with section `name` replaced by `body` (appended when absent).
pub fn replace(md: &str, name: &str, body: &str) -> String {
    let (begin, end) = markers(name);
    let block = format!("{begin}\n{}\n{end}", body.trim_end());
    match section(md, name) {
        Some(old) => md.replacen(old, &block, 1),
        None => {
            let mut out = md.trim_end().to_string();
            if !out.is_empty() {
                out.push_str("\n\n");
            }
            out.push_str(&block);
            out.push('\n');
            out
        }
    }
}

/// Replaces section `name` of the file at `path` (created when missing).
pub fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let md = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, replace(&md, name, body))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place_and_others_kept() {
        let md = replace("# Benchmarks\n", "tracer", "a\n");
        let md = replace(&md, "soak", "b");
        assert_eq!(
            md,
            "# Benchmarks\n\n<!-- tracer:begin -->\na\n<!-- tracer:end -->\n\n<!-- soak:begin -->\nb\n<!-- soak:end -->\n"
        );
        let md2 = replace(&md, "tracer", "c");
        assert!(md2.contains("<!-- tracer:begin -->\nc\n<!-- tracer:end -->"));
        assert!(md2.contains("<!-- soak:begin -->\nb\n<!-- soak:end -->"));
        assert_eq!(
            section(&md2, "soak"),
            Some("<!-- soak:begin -->\nb\n<!-- soak:end -->")
        );
    }
}
