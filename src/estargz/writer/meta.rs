//! Input metadata to TOC entry fields: names, times, owners.

use std::collections::HashMap;

use super::input::InputEntry;
use crate::estargz::toc::{EntryType, JsonEntry, Xattr};

/// Formats Unix seconds as RFC 3339 in UTC (`2006-01-02T15:04:05Z`);
/// empty for 0, which the format omits.
pub fn format_modtime(secs: i64) -> String {
    if secs == 0 {
        return String::new();
    }
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's method).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The name as written in the TOC: directories carry a trailing `/`, the
/// root directory is `./`.
pub fn toc_name(name: &str, kind: EntryType) -> String {
    match (kind, name.is_empty()) {
        (EntryType::Dir, true) => "./".to_string(),
        (EntryType::Dir, false) => format!("{name}/"),
        _ => name.to_string(),
    }
}

/// Writes user and group names only when they change for an id, as the
/// reference writer does; readers carry them forward.
#[derive(Default)]
pub(crate) struct OwnerNames {
    users: HashMap<i64, String>,
    groups: HashMap<i64, String>,
}

impl OwnerNames {
    fn if_changed(map: &mut HashMap<i64, String>, id: i64, name: &str) -> String {
        if name.is_empty() || map.get(&id).is_some_and(|n| n == name) {
            return String::new();
        }
        map.insert(id, name.to_string());
        name.to_string()
    }
}

/// The TOC entry of an input entry, without payload fields.
pub(crate) fn entry_from_input(e: &InputEntry, owners: &mut OwnerNames) -> JsonEntry {
    let mut j = JsonEntry::new(toc_name(&e.name, e.kind), e.kind);
    j.mode = e.mode;
    j.uid = e.uid;
    j.gid = e.gid;
    j.user_name = OwnerNames::if_changed(&mut owners.users, e.uid, &e.uname);
    j.group_name = OwnerNames::if_changed(&mut owners.groups, e.gid, &e.gname);
    j.modtime = format_modtime(e.mtime);
    j.link_name = e.link_name.clone();
    j.dev_major = e.dev_major;
    j.dev_minor = e.dev_minor;
    j.size = i64::try_from(e.size).unwrap_or(i64::MAX);
    j.xattrs = e
        .xattrs
        .iter()
        .map(|(k, v)| (k.clone(), Xattr(v.clone())))
        .collect();
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(format_modtime(0), "");
        assert_eq!(format_modtime(1), "1970-01-01T00:00:01Z");
        assert_eq!(format_modtime(1_566_297_043), "2019-08-20T10:30:43Z");
        assert_eq!(format_modtime(951_825_600), "2000-02-29T12:00:00Z");
        assert_eq!(format_modtime(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn owner_names_only_when_changed() {
        let mut o = OwnerNames::default();
        assert_eq!(OwnerNames::if_changed(&mut o.users, 1, "a"), "a");
        assert_eq!(OwnerNames::if_changed(&mut o.users, 1, "a"), "");
        assert_eq!(OwnerNames::if_changed(&mut o.users, 1, "b"), "b");
        assert_eq!(OwnerNames::if_changed(&mut o.users, 2, ""), "");
    }
}
