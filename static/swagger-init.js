// Swagger UI over this collector's OpenAPI document. A file of its own, so the page's
// Content-Security-Policy allows scripts from this origin only and no inline script at all.
// Relative, so it also works under a reverse proxy's path prefix.
window.ui = SwaggerUIBundle({ url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true });
