"""Hook point for the steering panel on the feature page (the steering issue fills it in).

The feature page calls `steering_panel(store, feature_id)` once, at the bottom of the page, after the
label/notes form. `store` is the open `saekit.features.FeatureStore` (its manifest names the SAE
directory, model and hook); `saekit.apps.live.LiveModel(store)` loads that model and SAE (the app caches
one per server in `browse.get_live(path)`). The panel draws its own header and widgets; widget keys
should start with "steer_" so they never collide with the page's own.
"""

from __future__ import annotations

from saekit.features import FeatureStore


def steering_panel(store: FeatureStore, feature_id: int) -> None:
    # Placeholder: deliberately renders nothing until the steering engineer replaces this body.
    return None
