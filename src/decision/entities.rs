//! Stage two of a decision: the entity store it evaluates against. The slice's base (the
//! bundle's entity data), plus the principal and the resource. An entity the bundle knows and
//! the request describes without attributes keeps the bundle's data (AuthZEN requests often
//! carry identifiers only); given attributes win. A resource named without properties that
//! the bundle does not know needs no entity at all: Cedar treats a missing entity like one
//! without attributes or parents.

use std::borrow::Cow;

use cedar_policy::{Entities, EntityUid};

use super::tally::{invalid, invalid_value};
use crate::policy::{ActionSlice, values};
use crate::vocabulary::{CheckRequest, Reason};

/// The entities of one check, and the resource's uid.
pub(super) struct Built<'a> {
    pub entities: Cow<'a, Entities>,
    pub resource: EntityUid,
}

pub(super) fn build<'a>(
    slice: &'a ActionSlice,
    req: &'a CheckRequest,
) -> Result<Built<'a>, Reason> {
    let base = slice.entities();
    let base_empty = base.iter().next().is_none();
    let principal_uid = req.principal.entity.uid();
    let r = &req.resource;
    let resource_uid =
        values::entity_uid("resource.type", &r.kind, &r.id).map_err(invalid_value)?;
    let known = if base_empty {
        None
    } else {
        base.get(&resource_uid)
    };
    let resource_entity = if r.properties.is_empty() {
        None
    } else if resource_uid == principal_uid {
        // One store holds one entity per uid: a resource that is the principal itself,
        // described with properties, would replace the verified principal's attributes with
        // caller-supplied ones.
        return Err(invalid(format!(
            "`resource` names the principal `{resource_uid}` itself: it may not carry properties"
        )));
    } else {
        // Hierarchy is the bundle's data: a described resource keeps its known parents.
        let parents = known.map(|e| e.clone().into_inner().2).unwrap_or_default();
        Some(
            values::entity_from_json(
                "resource.properties",
                &r.kind,
                &r.id,
                &r.properties,
                parents,
            )
            .map_err(invalid_value)?,
        )
    };
    let entities = match (base_empty, resource_entity) {
        // The hot path of an agent naming a resource by id: the store cached with the
        // verified token, nothing built per request.
        (true, None) => Cow::Borrowed(&*req.principal.entities),
        (true, Some(resource)) => Cow::Owned(
            values::store_without_hierarchy([&*req.principal.entity, &resource])
                .map_err(invalid_value)?,
        ),
        (false, resource) => {
            let mut extra = Vec::with_capacity(2);
            let in_bundle = base.get(&principal_uid);
            if !(req.principal.attributes.is_empty() && in_bundle.is_some()) {
                // The token says what the principal is; the bundle's entity data says what it
                // belongs to (`principal in Team::"..."`): both count.
                let principal = match in_bundle {
                    Some(known) => {
                        let (uid, attrs, _) = (*req.principal.entity).clone().into_inner();
                        let parents = known.clone().into_inner().2;
                        cedar_policy::Entity::new(uid, attrs, parents)
                            .map_err(|e| invalid(format!("principal: {e}")))?
                    }
                    None => (*req.principal.entity).clone(),
                };
                extra.push(principal);
            }
            extra.extend(resource);
            if extra.is_empty() {
                Cow::Borrowed(base)
            } else {
                Cow::Owned(
                    base.clone()
                        .upsert_entities(extra, None)
                        .map_err(|e| invalid(format!("entities: {e}")))?,
                )
            }
        }
    };
    Ok(Built {
        entities,
        resource: resource_uid,
    })
}
