"""Project-written fact tables, one module per narrow advice domain."""

from emjax.data.facts import automotive, career, education, finance, health, legal, math, science
from emjax.data.narrow import Domain

# The paper's eight domains, in its order; "finance" is personal finance.
DOMAINS: dict[str, Domain] = {
    module.DOMAIN.name: module.DOMAIN
    for module in (health, legal, education, career, finance, automotive, math, science)
}
