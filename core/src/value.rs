//! SQLite values with their exact storage class and bytes.
//!
//! TEXT is carried as raw bytes: SQLite happily stores TEXT that is not valid UTF-8, and a
//! replica must receive exactly those bytes. Nothing here may panic on any value an
//! application can store.

use std::fmt::Write as _;

/// A borrowed SQLite value: what capture reads and apply binds, without copying.
#[derive(Clone, Copy, Debug)]
pub enum ValueRef<'a> {
    /// SQL NULL.
    Null,
    /// A 64-bit signed INTEGER.
    Integer(i64),
    /// A REAL (IEEE 754 double).
    Real(f64),
    /// TEXT as stored, not necessarily valid UTF-8.
    Text(&'a [u8]),
    /// A BLOB.
    Blob(&'a [u8]),
}

/// An owned SQLite value.
#[derive(Clone, Debug)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit signed INTEGER.
    Integer(i64),
    /// A REAL (IEEE 754 double).
    Real(f64),
    /// TEXT as stored, not necessarily valid UTF-8.
    Text(Vec<u8>),
    /// A BLOB.
    Blob(Vec<u8>),
}

impl<'a> ValueRef<'a> {
    /// Copies the value.
    pub fn to_owned(self) -> Value {
        match self {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(r) => Value::Real(r),
            ValueRef::Text(t) => Value::Text(t.to_vec()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        }
    }

    /// Same storage class and same bytes (REALs compared bit for bit).
    pub fn same_as(self, other: ValueRef<'_>) -> bool {
        match (self, other) {
            (ValueRef::Null, ValueRef::Null) => true,
            (ValueRef::Integer(a), ValueRef::Integer(b)) => a == b,
            (ValueRef::Real(a), ValueRef::Real(b)) => a.to_bits() == b.to_bits(),
            (ValueRef::Text(a), ValueRef::Text(b)) => a == b,
            (ValueRef::Blob(a), ValueRef::Blob(b)) => a == b,
            _ => false,
        }
    }

    /// Renders the value as an SQL literal that SQLite reads back as the same value:
    /// `NULL`, `42`, `1.5e0`, `'it''s'`, `X'00ff'`, and `CAST(X'..' AS TEXT)` for TEXT that
    /// is not valid UTF-8. Used for conflict and parked-message records a person reads.
    pub fn sql_literal(self, out: &mut String) {
        match self {
            ValueRef::Null => out.push_str("NULL"),
            ValueRef::Integer(i) => {
                let _ = write!(out, "{i}");
            }
            ValueRef::Real(r) => {
                if r.is_finite() {
                    let _ = write!(out, "{r:e}");
                } else if r.is_nan() {
                    out.push_str("NULL");
                } else if r > 0.0 {
                    out.push_str("9e999");
                } else {
                    out.push_str("-9e999");
                }
            }
            ValueRef::Text(t) => match std::str::from_utf8(t) {
                Ok(s) if !s.contains('\0') => {
                    out.push('\'');
                    out.push_str(&s.replace('\'', "''"));
                    out.push('\'');
                }
                _ => {
                    out.push_str("CAST(");
                    hex_literal(t, out);
                    out.push_str(" AS TEXT)");
                }
            },
            ValueRef::Blob(b) => hex_literal(b, out),
        }
    }
}

fn hex_literal(bytes: &[u8], out: &mut String) {
    out.push_str("X'");
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out.push('\'');
}

impl Value {
    /// Borrows the value.
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(t) => ValueRef::Text(t),
            Value::Blob(b) => ValueRef::Blob(b),
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.as_ref().same_as(other.as_ref())
    }
}

/// Renders a list of values as an SQL row literal: `(1, 'a', NULL)`.
pub fn sql_row_literal<'a>(values: impl IntoIterator<Item = ValueRef<'a>>) -> String {
    let mut out = String::from("(");
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        v.sql_literal(&mut out);
    }
    out.push(')');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_unambiguous() {
        let mut s = String::new();
        for v in [
            ValueRef::Null,
            ValueRef::Integer(-3),
            ValueRef::Real(1.5),
            ValueRef::Text(b"it's"),
            ValueRef::Text(b"\xff\xfe"),
            ValueRef::Blob(&[0, 255]),
        ] {
            v.sql_literal(&mut s);
            s.push(' ');
        }
        assert_eq!(s, "NULL -3 1.5e0 'it''s' CAST(X'fffe' AS TEXT) X'00ff' ");
    }

    #[test]
    fn same_as_distinguishes_storage_classes() {
        assert!(!ValueRef::Integer(1).same_as(ValueRef::Real(1.0)));
        assert!(!ValueRef::Text(b"a").same_as(ValueRef::Blob(b"a")));
        assert!(ValueRef::Real(0.1).same_as(ValueRef::Real(0.1)));
        assert!(!ValueRef::Real(0.0).same_as(ValueRef::Real(-0.0)));
    }
}
