"""``get_dashboard_url()`` of Modal's objects: where an object is shown on the daemon's web dashboard."""

from __future__ import annotations

from shoal.exception import NotFoundError
from shoal.sdk._sync import live_method
from shoal.sdk.transport import default_client
from shoal.wire import routes


class DashboardLink:
    """Adds ``get_dashboard_url()``; a class says which page shows its objects (``_dashboard_page``)."""

    def _dashboard_page(self) -> str:
        raise NotImplementedError

    @live_method
    async def get_dashboard_url(self) -> str:
        """The URL of this object's page on the daemon's dashboard (``shoal dashboard`` signs a browser in)."""
        try:
            info = await default_client().request("GET", routes.DASHBOARD)
        except NotFoundError:
            raise NotFoundError("this daemon runs no dashboard (it was started with --dashboard off)") from None
        return f"{info['url']}/#/{self._dashboard_page()}"
