//! Responses (RFC 3261 §16.7, stateless): the top Via must be this edge's, with a branch that
//! verifies against the Via below it; that top Via is removed and the response goes where the next
//! Via says (`received`/`rport` first). Anything else is dropped: a stateless proxy that relays
//! responses it did not cause is a reflector.

use super::via::{self, ViaInfo};
use super::{Action, Decision, Inbound, Outcome, Proxy, Side};
use crate::sip::{Edit, HeaderName, Message};

pub(super) fn handle(p: &Proxy, m: &Message<'_>, _inb: &Inbound<'_>, side: Side) -> Decision {
    let drop = |reason: &str| Decision {
        action: Action::Drop,
        outcome: Outcome::Dropped,
        side,
        reason: Some(reason.to_string()),
    };
    let vias = m.elements(HeaderName::Via);
    let Some((top_header, top_range)) = vias.first().cloned() else {
        return drop("response without Via");
    };
    let Some(top) = ViaInfo::parse(m.text(top_range.clone())) else {
        return drop("response with unreadable Via");
    };
    if !p.is_self(&top.host, top.port) {
        return drop("response whose top Via is not this edge");
    }
    let Some((_, next_range)) = vias.get(1).cloned() else {
        return drop("response addressed to the edge itself");
    };
    let Some(next) = ViaInfo::parse(m.text(next_range)) else {
        return drop("response with unreadable second Via");
    };
    let (Some(call_id), Some((cseq, _))) = (m.call_id(), m.cseq()) else {
        return drop("response without Call-ID or CSeq");
    };
    let ours = top.branch.as_deref().unwrap_or("");
    if !via::verify_branch(&p.keys, ours, &next, call_id, cseq) {
        return drop("response whose Via branch does not verify (forged or altered Via)");
    }

    let mut e = Edit::new(m.buf);
    let header = &m.headers[top_header];
    let same_line: Vec<_> = vias.iter().filter(|(h, _)| *h == top_header).collect();
    if same_line.len() == 1 {
        e.remove(header.line.clone());
    } else {
        let rest = same_line[1..]
            .iter()
            .map(|(_, r)| m.text(r.clone()))
            .collect::<Vec<_>>()
            .join(", ");
        e.replace(header.value.clone(), rest);
    }
    let listener = p.listener_toward(
        match side {
            Side::Internet => Side::Pbx,
            Side::Pbx => Side::Internet,
        },
        next.transport,
    );
    Decision {
        action: Action::Forward {
            transport: next.transport,
            dest: next.response_target(),
            listener,
            bytes: e.finish(),
        },
        outcome: Outcome::Forwarded,
        side,
        reason: None,
    }
}
