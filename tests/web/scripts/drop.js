// Drop a file on an element the way a browser does: a DataTransfer holding a File, carried by
// dragenter, dragover and drop events. Called with [selector, name, mime type, base64 bytes].
([selector, name, type, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type }));
  const target = document.querySelector(selector);
  for (const kind of ["dragenter", "dragover", "drop"]) {
    const init = { bubbles: true, cancelable: true, dataTransfer: transfer };
    target.dispatchEvent(new DragEvent(kind, init));
  }
}
