// ledgerflow web UI: the one helper its htmx attributes call.
// A live part of a page is not refreshed while the reader is using it (a traceback or the
// raw history open, a reason being typed): the refresh would undo that under their eyes.
window.ledgerflowIdle = function (element) {
  return !element.querySelector("details[open]") && !element.contains(document.activeElement);
};
