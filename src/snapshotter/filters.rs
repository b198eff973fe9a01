//! containerd's filter language, as accepted by `List`.
//!
//! One filter string is a comma-separated list of selectors that must all
//! match (AND); several filter strings are alternatives (OR). A selector is
//! `fieldpath [op value]`:
//!
//! - `fieldpath` is fields joined by `.`; a field is `[A-Za-z0-9_-]+` or a
//!   quoted string, so `labels."containerd.io/gc.root"` names one label;
//! - `op` is `==`, `!=` or `~=` (regular expression); without an operator the
//!   selector tests that the field is present;
//! - `value` is a quoted string or a run of characters up to `,` or space.
//!
//! Quotes are `"`, `/` or `|` with Go-style escapes (`\n`, `\"`, `\x41`,
//! `\u00e9`, ...), so a regular expression may be written `/^a.*$/`.
//! `!=` matches an absent field (as containerd does); `==` never does.
//!
//! [`Fields`] adapts an object to the field paths; [`SnapshotFields`] does it
//! for snapshots (`name`, `parent`, `kind`, `labels.<key>`).

use std::collections::BTreeMap;

use regex::Regex;

use super::error::{Error, Result};

/// An object whose fields a filter can look up.
pub trait Fields {
    /// The value at `path`, or `None` when the field is absent.
    fn field(&self, path: &[String]) -> Option<&str>;
}

/// A parsed set of filters: matches when any alternative matches.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Empty means "match everything".
    alternatives: Vec<Vec<Selector>>,
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Filter {
    /// Parses filter strings; several strings are OR-ed, an empty string
    /// matches everything. Errors are `InvalidArgument`.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter> {
        let mut alternatives = Vec::with_capacity(filters.len());
        for f in filters {
            let f = f.as_ref();
            if f.is_empty() {
                // An empty alternative matches everything.
                return Ok(Filter::default());
            }
            alternatives.push(Parser::new(f).selectors().map_err(|msg| {
                Error::InvalidArgument(format!("filter {f:?}: parse error: {msg}"))
            })?);
        }
        Ok(Filter { alternatives })
    }

    /// Whether `obj` passes the filter.
    pub fn matches(&self, obj: &impl Fields) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|all| all.iter().all(|s| s.matches(obj)))
    }
}

impl Selector {
    fn matches(&self, obj: &impl Fields) -> bool {
        let value = obj.field(&self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value == Some(v.as_str()),
            Op::NotEqual(v) => value.unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.unwrap_or("")),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser { input, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn peek(&mut self) -> Option<char> {
        self.skip_space();
        self.rest().chars().next()
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("at offset {}: {what}", self.pos))
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, String> {
        let mut out = vec![self.selector()?];
        loop {
            match self.peek() {
                None => return Ok(out),
                Some(',') => {
                    self.pos += 1;
                    out.push(self.selector()?);
                }
                Some(c) => return self.err(&format!("unexpected input {c:?}")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let path = self.fieldpath()?;
        let op = match self.peek() {
            None | Some(',') => Op::Present,
            Some('=' | '!' | '~') => {
                let start = self.pos;
                let len = self
                    .rest()
                    .find(|c| !matches!(c, '=' | '!' | '~'))
                    .unwrap_or(self.rest().len());
                self.pos += len;
                let op = &self.input[start..self.pos];
                let value = self.value()?;
                match op {
                    "==" => Op::Equal(value),
                    "!=" => Op::NotEqual(value),
                    "~=" => Op::Matches(
                        Regex::new(&value).map_err(|e| format!("bad regular expression: {e}"))?,
                    ),
                    _ => {
                        self.pos = start;
                        return self.err(&format!("unsupported operator {op:?}"));
                    }
                }
            }
            Some(c) => return self.err(&format!("expected an operator, found {c:?}")),
        };
        Ok(Selector { path, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, String> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(q) if is_quote(q) => self.quoted(q),
            Some(c) if is_field_char(c) => {
                let rest = self.rest();
                let len = rest.find(|c| !is_field_char(c)).unwrap_or(rest.len());
                self.pos += len;
                Ok(rest[..len].to_string())
            }
            Some(c) => self.err(&format!("expected a field or quoted string, found {c:?}")),
            None => self.err("expected a field or quoted string, found end of input"),
        }
    }

    fn value(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(q) if is_quote(q) => self.quoted(q),
            Some(',' | '.' | '=' | '!' | '~') | None => self.err("expected a value"),
            Some(_) => {
                let rest = self.rest();
                let len = rest
                    .find(|c: char| c == ',' || c.is_whitespace())
                    .unwrap_or(rest.len());
                self.pos += len;
                Ok(rest[..len].to_string())
            }
        }
    }

    /// Reads a quoted string starting at the opening quote `q`.
    fn quoted(&mut self, q: char) -> Result<String, String> {
        let mut out = String::new();
        let mut chars = self.rest().char_indices().skip(1);
        loop {
            let Some((i, c)) = chars.next() else {
                return self.err("quoted string not terminated");
            };
            if c == q {
                self.pos += i + c.len_utf8();
                return Ok(out);
            }
            if c == '\n' {
                return self.err("newline in quoted string");
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some((_, e)) = chars.next() else {
                return self.err("quoted string not terminated");
            };
            let simple = match e {
                'a' => Some('\x07'),
                'b' => Some('\x08'),
                'f' => Some('\x0c'),
                'n' => Some('\n'),
                'r' => Some('\r'),
                't' => Some('\t'),
                'v' => Some('\x0b'),
                '\\' => Some('\\'),
                e if e == q => Some(q),
                _ => None,
            };
            if let Some(s) = simple {
                out.push(s);
                continue;
            }
            let (digits, radix) = match e {
                'x' => (2, 16),
                'u' => (4, 16),
                'U' => (8, 16),
                '0'..='7' => (2, 8),
                _ => return self.err(&format!("illegal escape \\{e}")),
            };
            let mut code: u32 = if radix == 8 { e as u32 - '0' as u32 } else { 0 };
            for _ in 0..digits {
                let d = chars.next().and_then(|(_, c)| c.to_digit(radix));
                match d {
                    Some(d) => code = code * radix + d,
                    None => return self.err("illegal numeric escape"),
                }
            }
            match char::from_u32(code) {
                Some(c) if radix == 16 && e != 'x' || code < 0x80 => out.push(c),
                Some(_) if code <= 0xff => {
                    // A single byte above ASCII; Rust strings must stay
                    // UTF-8, so keep it as the Latin-1 character.
                    out.push(char::from(code as u8));
                }
                _ => return self.err("escape is not a valid character"),
            }
        }
    }
}

/// Adapts a snapshot's info to filter field paths.
pub struct SnapshotFields<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    /// `active`, `view` or `committed`.
    pub kind: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

impl Fields for SnapshotFields<'_> {
    fn field(&self, path: &[String]) -> Option<&str> {
        match path.first()?.as_str() {
            "name" => Some(self.name),
            "parent" => Some(self.parent),
            "kind" => Some(self.kind),
            "labels" => {
                if path.len() == 2 {
                    self.labels.get(&path[1]).map(String::as_str)
                } else {
                    self.labels.get(&path[1..].join(".")).map(String::as_str)
                }
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap<'a>(
        name: &'a str,
        parent: &'a str,
        kind: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> SnapshotFields<'a> {
        SnapshotFields {
            name,
            parent,
            kind,
            labels,
        }
    }

    fn m(filters: &[&str], obj: &SnapshotFields<'_>) -> bool {
        Filter::parse_all(filters).unwrap().matches(obj)
    }

    #[test]
    fn selectors_and_operators() {
        let mut labels = BTreeMap::new();
        labels.insert("containerd.io/gc.root".to_string(), "yes".to_string());
        labels.insert("x".to_string(), "1".to_string());
        let s = snap("layer-1", "base", "committed", &labels);
        assert!(m(&[], &s));
        assert!(m(&[""], &s));
        assert!(m(&["name==layer-1"], &s));
        assert!(!m(&["name==layer-2"], &s));
        assert!(m(&["name!=layer-2"], &s));
        assert!(m(&["parent==base,kind==committed"], &s));
        assert!(!m(&["parent==base,kind==active"], &s));
        assert!(m(&["kind==active", "kind==committed"], &s));
        assert!(m(&[r#"labels."containerd.io/gc.root"==yes"#], &s));
        assert!(m(&[r#"labels."containerd.io/gc.root""#], &s));
        assert!(m(&["labels.x"], &s));
        assert!(!m(&["labels.y"], &s));
        assert!(m(&["labels.y!=1"], &s), "!= matches an absent field");
        assert!(!m(&["labels.y==1"], &s));
        assert!(m(&["name~=^layer-[0-9]+$"], &s));
        assert!(m(&["name~=/^lay.r/"], &s));
        assert!(!m(&["name~=^base"], &s));
        assert!(m(&[r#"name=="layer-1""#], &s));
        assert!(m(&[" name == layer-1 , kind==committed "], &s));
        assert!(m(&["labels.x==1,name~=|layer|"], &s));
    }

    #[test]
    fn dotted_values_and_escapes() {
        let mut labels = BTreeMap::new();
        labels.insert("a.b".to_string(), "v.1,2".to_string());
        let s = snap("sha256:abc.def", "", "active", &labels);
        assert!(m(&["name==sha256:abc.def"], &s));
        assert!(m(&["labels.a.b"], &s), "unquoted path joins with dots");
        assert!(m(&[r#"labels."a.b"=="v.1,2""#], &s));
        assert!(m(&[r#"labels."a.b"=="v\x2e1\u002c2""#], &s));
        assert!(m(&["parent==\"\""], &s));
    }

    #[test]
    fn bad_filters_are_invalid_argument() {
        for bad in [
            "name==",
            "name=",
            "name===x",
            "==x",
            "name==x,",
            "name==x y",
            "labels.\"unterminated",
            "name~=(",
            "name==\"bad\\q\"",
            "name.",
            ",",
            "name>x",
        ] {
            let err = Filter::parse_all(&[bad]).expect_err(bad);
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
        }
    }
}
