//! Host-defined fields of vCPU state: parts of the XSAVE area the host fills in, which differ
//! between hosts without being guest state, so diffs report them apart.

use devstate::Value;

use crate::vcpu::XCR0_ALLOWED;

/// Replaces every XSAVE area in decoded vCPU state (a record with `cpu_model` and `xsave`,
/// at any depth) by its guest view ([`machine_types::cpu::xsave::normalise`]): MXCSR_MASK,
/// the kernel's software-reserved words and components in their init state are filled in by
/// the host, differ between CPU vendors, and are not guest state. Returns each area as it
/// was, with its path, so a diff can report host-defined differences apart.
pub fn normalise_host_fields(fields: &mut [(String, Value)]) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    normalise_at("", fields, &mut out);
    out
}

fn normalise_at(path: &str, fields: &mut [(String, Value)], out: &mut Vec<(String, Vec<u32>)>) {
    let xcr0 = fields.iter().find_map(|(n, v)| match (n.as_str(), v) {
        ("cpu_model", Value::Str(m)) => {
            Some(machine_types::CpuModel::by_name(m).map_or(XCR0_ALLOWED.into(), |m| m.xcr0_mask()))
        }
        _ => None,
    });
    for (name, v) in fields.iter_mut() {
        match (name.as_str(), v, xcr0) {
            ("xsave", Value::List(words), Some(xcr0)) => {
                let raw: Vec<u32> = words
                    .iter()
                    .map(|w| match w {
                        Value::Uint(x) => *x as u32,
                        _ => 0,
                    })
                    .collect();
                let guest = machine_types::cpu::xsave::normalise(&raw, xcr0);
                *words = guest.iter().map(|&w| Value::Uint(w.into())).collect();
                out.push((format!("{path}.xsave"), raw));
            }
            (_, Value::Record(inner), _) => {
                normalise_at(&format!("{path}.{name}"), inner, out);
            }
            _ => {}
        }
    }
}

/// The [`devstate::diff::Normalise`] hook for vCPU state: both sides' XSAVE areas as the
/// guest sees them ([`normalise_host_fields`]), with each area's host-defined differences.
pub fn host_fields(a: &mut [(String, Value)], b: &mut [(String, Value)]) -> Vec<(String, String)> {
    let (ha, hb) = (normalise_host_fields(a), normalise_host_fields(b));
    ha.iter()
        .zip(&hb)
        .filter_map(|((at, x), (_, y))| {
            let f = machine_types::cpu::xsave::host_field_differences(x, y);
            (!f.is_empty()).then(|| {
                (
                    at.trim_start_matches('.').to_owned(),
                    format!("host-defined fields differ ({})", f.join(", ")),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use machine_types::cpu::xsave;

    use super::*;

    /// A decoded `hot-vcpu`-like record: the vCPU state nested one level down.
    fn record(mxcsr_mask: u32, xmm0: u32) -> Vec<(String, Value)> {
        let mut w = vec![0u32; xsave::WORDS];
        w[xsave::MXCSR] = 0x1f80;
        w[xsave::MXCSR_MASK] = mxcsr_mask;
        w[xsave::XMM.start] = xmm0;
        let cpu = vec![
            ("cpu_model".to_owned(), Value::Str("ferry-v3".into())),
            (
                "xsave".to_owned(),
                Value::List(w.iter().map(|&x| Value::Uint(x.into())).collect()),
            ),
        ];
        vec![
            ("core".to_owned(), Value::Uint(1)),
            ("cpu".to_owned(), Value::Record(cpu)),
        ]
    }

    #[test]
    fn host_defined_differences_are_named_with_their_path_and_normalised_away() {
        let (mut a, mut b) = (record(0x2ffff, 0), record(0xffff, 0));
        assert_eq!(
            host_fields(&mut a, &mut b),
            [(
                "cpu.xsave".to_owned(),
                "host-defined fields differ (MXCSR_MASK)".to_owned()
            )]
        );
        assert_eq!(a, b, "both sides hold the guest view");
        // An XMM register with SSE not in use (XSTATE_BV clear) is filler too, and reported.
        let (mut a, mut b) = (record(0xffff, 0), record(0xffff, 7));
        let h = host_fields(&mut a, &mut b);
        assert_eq!(
            h[0].1,
            "host-defined fields differ (components in their init state)"
        );
        assert_eq!(a, b);
        // Identical areas report nothing.
        let (mut a, mut b) = (record(0xffff, 0), record(0xffff, 0));
        assert!(host_fields(&mut a, &mut b).is_empty());
    }
}
