// /docs: Swagger UI for /openapi.json, started from this file rather than an inline <script> (what FastAPI's
// get_swagger_ui_html writes), so the page runs under the server's Content-Security-Policy without
// 'unsafe-inline'. Swagger UI's files come from this server (/docs/static, fastapi-offline), not a CDN.
"use strict";

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  validatorUrl: null,  // no badge image from validator.swagger.io: an offline ward PC, and img-src 'self'
});
